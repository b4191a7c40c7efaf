"""The SDK's public names are a promise: adding one is a decision, removing one breaks users."""

from __future__ import annotations

import taskbroker


def test_public_api_is_exactly_these_names() -> None:
    assert set(taskbroker.__all__) == {
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
    }


def test_every_exported_name_exists_and_is_documented() -> None:
    for name in taskbroker.__all__:
        value = getattr(taskbroker, name)
        assert value.__doc__, f"taskbroker.{name} has no docstring"
