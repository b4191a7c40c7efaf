"""taskbroker: the Python SDK. A producer client, a worker runtime and a CLI for the taskbroker
gRPC broker. The generated taskbroker.v1 API lives in taskbroker.v1."""

from taskbroker import testing
from taskbroker._client import Client, EnqueueResult, NewTask
from taskbroker._errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    LeaseStaleError,
    NonRetryable,
    RetryLater,
    TaskbrokerError,
    TaskNotFoundError,
    UnavailableError,
)
from taskbroker._handler import Handler, TaskContext, handler
from taskbroker._models import AttemptError, QueueStats, Task, TaskId, TaskState
from taskbroker._sync import SyncClient
from taskbroker._worker import Worker
from taskbroker.codec import from_json, json_payload
from taskbroker.encryption import AesGcmCodec, CodecError, Keyring, PayloadCodec

__all__ = [
    "AesGcmCodec",
    "AlreadyExistsError",
    "AttemptError",
    "Client",
    "CodecError",
    "EnqueueResult",
    "FailedPreconditionError",
    "Handler",
    "InvalidArgumentError",
    "Keyring",
    "LeaseStaleError",
    "NewTask",
    "NonRetryable",
    "PayloadCodec",
    "QueueStats",
    "RetryLater",
    "SyncClient",
    "Task",
    "TaskContext",
    "TaskId",
    "TaskNotFoundError",
    "TaskState",
    "TaskbrokerError",
    "UnavailableError",
    "Worker",
    "from_json",
    "handler",
    "json_payload",
    "testing",
]
