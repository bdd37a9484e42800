"""The workload side of identity: a key in memory, an SVID from the CA, renewed before it expires,
and the TLS contexts built from it."""
