"""The sidecar injector: a mutating admission webhook, and `sidemesh inject` offline."""
