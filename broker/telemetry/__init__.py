"""Telemetry: the gRPC server interceptors that trace (OpenTelemetry) and time (Prometheus) every
RPC, sharing one interceptor base. The /metrics collector itself is served by broker/web."""
