"""taskbroker: the Python SDK. A producer client, a worker runtime and a CLI for the taskbroker
gRPC broker. The generated taskbroker.v1 API lives in taskbroker.v1.

The public names load on first use (PEP 562): importing the generated `taskbroker.v1`, as the
broker does, runs this module without loading the client, the worker or their dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskbroker import testing
    from taskbroker._channel import TlsConfig
    from taskbroker._client import Client, EnqueueResult
    from taskbroker._errors import (
        AlreadyExistsError,
        FailedPreconditionError,
        InvalidArgumentError,
        LeaseStaleError,
        NonRetryable,
        PermissionDeniedError,
        RetryLater,
        ScheduleNotFoundError,
        TaskbrokerError,
        TaskNotFoundError,
        UnauthenticatedError,
        UnavailableError,
    )
    from taskbroker._handler import Handler, TaskContext, handler
    from taskbroker._models import (
        AttemptError,
        AuditRecord,
        CatchUp,
        GroupKeyPage,
        GroupKeyState,
        GroupKeyStats,
        NewTask,
        ParentFailurePolicy,
        ParentResult,
        QueueSettings,
        QueueStats,
        RateLimit,
        Schedule,
        Task,
        TaskId,
        TaskState,
    )
    from taskbroker._sync import SyncClient
    from taskbroker._worker import Worker
    from taskbroker._workflow import Chain, EnqueuedWorkflow, Group, chain, chord, group
    from taskbroker.codec import from_json, json_payload
    from taskbroker.encryption import AesGcmCodec, CodecError, Keyring, PayloadCodec

#: Where each public name is defined.
_MODULES: dict[str, str] = {
    "AesGcmCodec": "taskbroker.encryption",
    "AlreadyExistsError": "taskbroker._errors",
    "AttemptError": "taskbroker._models",
    "AuditRecord": "taskbroker._models",
    "CatchUp": "taskbroker._models",
    "Chain": "taskbroker._workflow",
    "Client": "taskbroker._client",
    "CodecError": "taskbroker.encryption",
    "EnqueueResult": "taskbroker._client",
    "EnqueuedWorkflow": "taskbroker._workflow",
    "FailedPreconditionError": "taskbroker._errors",
    "Group": "taskbroker._workflow",
    "GroupKeyPage": "taskbroker._models",
    "GroupKeyState": "taskbroker._models",
    "GroupKeyStats": "taskbroker._models",
    "Handler": "taskbroker._handler",
    "InvalidArgumentError": "taskbroker._errors",
    "Keyring": "taskbroker.encryption",
    "LeaseStaleError": "taskbroker._errors",
    "NewTask": "taskbroker._models",
    "NonRetryable": "taskbroker._errors",
    "ParentFailurePolicy": "taskbroker._models",
    "ParentResult": "taskbroker._models",
    "PayloadCodec": "taskbroker.encryption",
    "QueueSettings": "taskbroker._models",
    "QueueStats": "taskbroker._models",
    "RateLimit": "taskbroker._models",
    "RetryLater": "taskbroker._errors",
    "Schedule": "taskbroker._models",
    "ScheduleNotFoundError": "taskbroker._errors",
    "SyncClient": "taskbroker._sync",
    "Task": "taskbroker._models",
    "TaskContext": "taskbroker._handler",
    "TaskId": "taskbroker._models",
    "TaskNotFoundError": "taskbroker._errors",
    "TaskState": "taskbroker._models",
    "TaskbrokerError": "taskbroker._errors",
    "TlsConfig": "taskbroker._channel",
    "UnauthenticatedError": "taskbroker._errors",
    "UnavailableError": "taskbroker._errors",
    "PermissionDeniedError": "taskbroker._errors",
    "Worker": "taskbroker._worker",
    "chain": "taskbroker._workflow",
    "chord": "taskbroker._workflow",
    "from_json": "taskbroker.codec",
    "group": "taskbroker._workflow",
    "handler": "taskbroker._handler",
    "json_payload": "taskbroker.codec",
    "testing": "taskbroker.testing",
}

__all__ = [
    "AesGcmCodec",
    "AlreadyExistsError",
    "AttemptError",
    "AuditRecord",
    "CatchUp",
    "Chain",
    "Client",
    "CodecError",
    "EnqueueResult",
    "EnqueuedWorkflow",
    "FailedPreconditionError",
    "Group",
    "GroupKeyPage",
    "GroupKeyState",
    "GroupKeyStats",
    "Handler",
    "InvalidArgumentError",
    "Keyring",
    "LeaseStaleError",
    "NewTask",
    "NonRetryable",
    "ParentFailurePolicy",
    "ParentResult",
    "PayloadCodec",
    "PermissionDeniedError",
    "QueueSettings",
    "QueueStats",
    "RateLimit",
    "RetryLater",
    "Schedule",
    "ScheduleNotFoundError",
    "SyncClient",
    "Task",
    "TaskContext",
    "TaskId",
    "TaskNotFoundError",
    "TaskState",
    "TaskbrokerError",
    "TlsConfig",
    "UnauthenticatedError",
    "UnavailableError",
    "Worker",
    "chain",
    "chord",
    "from_json",
    "group",
    "handler",
    "json_payload",
    "testing",
]


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'taskbroker' has no attribute {name!r}")
    loaded = importlib.import_module(module)
    value = loaded if name == "testing" else getattr(loaded, name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
