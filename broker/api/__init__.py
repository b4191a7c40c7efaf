"""The gRPC API: the server, its services and the Lease stream; the only package that imports
the generated taskbroker.v1 code."""
