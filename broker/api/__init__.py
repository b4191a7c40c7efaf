"""The gRPC API: the only package that imports grpc and taskbroker.v1."""
