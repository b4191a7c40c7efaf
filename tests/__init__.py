"""taskbroker's tests: real redis-server processes, an in-process broker, real gRPC channels."""
