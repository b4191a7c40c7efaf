"""taskbroker: the Python SDK. The generated taskbroker.v1 API lives in taskbroker.v1."""
