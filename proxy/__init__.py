"""The Sidemesh sidecar: `sidemesh proxy init` (iptables capture) and `sidemesh proxy run`."""
