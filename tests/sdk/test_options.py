"""The enqueue options: one definition (TaskOptions) shared by NewTask, Client.enqueue and
SyncClient.enqueue, checked at run time and documented where each takes them."""

from __future__ import annotations

import dataclasses
import pydoc
from collections.abc import Callable
from datetime import timedelta

import pytest

from taskbroker import Client, NewTask, SyncClient
from taskbroker._options import RENAMED, TaskOptions


def test_new_task_has_an_attribute_per_option() -> None:
    names = [f.name for f in dataclasses.fields(NewTask)]

    assert names[:3] == ["queue", "type", "payload"]
    assert set(names[3:]) == TaskOptions.__optional_keys__ - RENAMED.keys()
    assert set(RENAMED.values()) <= set(names)


def test_new_task_defaults_and_equality_are_those_of_a_dataclass() -> None:
    task = NewTask("emails", "send", priority=3)

    assert (task.payload, task.priority, task.delay, task.headers) == (b"", 3, None, None)
    assert task == NewTask("emails", "send", b"", priority=3)
    assert dataclasses.replace(task, priority=4).priority == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.priority = 5  # type: ignore[misc]


async def test_a_misspelt_option_is_a_type_error_for_each_signature() -> None:
    with pytest.raises(TypeError, match="'prio'"):
        NewTask("emails", "send", prio=1)  # type: ignore[call-arg]
    async with Client("127.0.0.1:1") as client:
        with pytest.raises(TypeError, match="'prio'"):
            await client.enqueue("emails", "send", prio=1)  # type: ignore[call-arg]
    with SyncClient("127.0.0.1:1") as sync, pytest.raises(TypeError, match="'prio'"):
        sync.enqueue("emails", "send", prio=1)  # type: ignore[call-arg]


@pytest.mark.parametrize("taker", [NewTask, Client.enqueue, SyncClient.enqueue])
def test_help_shows_every_option_where_it_is_taken(taker: Callable[..., object]) -> None:
    text = pydoc.render_doc(taker, renderer=pydoc.TextDoc())

    for name in TaskOptions.__optional_keys__:
        assert f"{name}: " in text


def test_new_task_takes_the_deprecated_retry_names_with_a_warning() -> None:
    wanted = NewTask("jobs", "run", initial_backoff=timedelta(seconds=2), max_backoff=None)

    with pytest.warns(DeprecationWarning, match="retry_initial is deprecated: use initial_backoff"):
        task = NewTask("jobs", "run", retry_initial=timedelta(seconds=2))
    with pytest.warns(DeprecationWarning, match="retry_max is deprecated: use max_backoff") as w:
        assert task.retry_max is None

    assert task == wanted
    assert w[0].filename == __file__  # the warning points at the caller's line


def test_an_option_under_both_names_is_a_type_error() -> None:
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="give max_backoff"):
        NewTask("jobs", "run", max_backoff=timedelta(1), retry_max=timedelta(2))
    with pytest.warns(DeprecationWarning):  # None is an option left out
        task = NewTask("jobs", "run", max_backoff=timedelta(1), retry_max=None)
    assert task.max_backoff == timedelta(1)
