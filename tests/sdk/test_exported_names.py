"""The SDK's public names are a promise: adding one is a decision, removing one breaks users."""

from __future__ import annotations

import subprocess
import sys

import taskbroker


def test_public_api_is_exactly_these_names() -> None:
    assert set(taskbroker.__all__) == {
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
        "UnavailableError",
        "UnauthenticatedError",
        "PermissionDeniedError",
        "Worker",
        "chain",
        "chord",
        "from_json",
        "group",
        "handler",
        "json_payload",
        "testing",
    }


def test_every_exported_name_exists_and_is_documented() -> None:
    for name in taskbroker.__all__:
        value = getattr(taskbroker, name)
        assert value.__doc__, f"taskbroker.{name} has no docstring"


def test_every_public_name_maps_to_where_it_is_defined() -> None:
    assert set(taskbroker._MODULES) == set(taskbroker.__all__)


def test_the_broker_does_not_load_the_sdk() -> None:
    """The server imports the generated taskbroker.v1 only: the client, the worker, the CLI and
    their dependencies stay out of the broker process."""
    script = (
        "import sys, broker.app, broker.__main__; "
        "print(sorted(m for m in sys.modules if m.startswith('taskbroker') "
        "and not m.startswith('taskbroker.v1')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['taskbroker']"
