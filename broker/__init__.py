"""taskbroker's server: a gRPC task broker that fronts Redis."""
