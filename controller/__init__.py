"""The Sidemesh controller: watches the cluster once and streams configuration to every sidecar."""
