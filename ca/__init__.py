"""The Sidemesh certificate authority: issues short-lived SPIFFE X.509-SVIDs over gRPC."""
