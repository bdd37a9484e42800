"""The mesh's view of the cluster (Services, workloads, namespaces, policies) and the pure
compilation of what one sidecar needs from it."""
