"""Workflows: tasks enqueued together with the order they run in, built from three shapes.

`chain(a, b, c)` runs its steps one after another, `group(a, b, c)` runs its members side by
side, and `chord(group(...), callback)` runs the callback once every member has succeeded
(fan-in: its handler reads their results in `ctx.parent_results`). A step or member is a
`NewTask` or another shape, so shapes nest:

```python
flow = chain(
    NewTask("media", "upload", b"album-7"),
    group(*(NewTask("media", "resize", name) for name in photos)),  # after the upload
    NewTask("emails", "send_album", b"ada@example.com"),  # after every resize
)
enqueued = await client.enqueue_workflow(flow)
album_mail = await client.wait(enqueued.last)
```

They are plain values on the dependency API (taskbroker.v1.TaskSpec.depends_on_positions):
`Client.enqueue_workflow` lays the shape out as a list of tasks, each naming the positions of
the tasks it waits for, and sends it in one Enqueue call, so the broker stores the whole graph
or none of it. Nothing here talks to the broker.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

from taskbroker._models import NewTask, TaskId

#: A workflow: one task, or a chain or group of workflows.
Shape: TypeAlias = "NewTask | Chain | Group"


def _checked(kind: str, items: Iterable[Shape]) -> tuple[Shape, ...]:
    shapes = tuple(items)
    if not shapes:
        raise ValueError(f"{kind}() needs at least one task")
    for shape in shapes:
        if not isinstance(shape, NewTask | Chain | Group):
            raise TypeError(
                f"{kind}(): each part is a NewTask, chain(...) or group(...), "
                f"not {type(shape).__name__}" + (" (unpack it with *)" if kind != "chord" else "")
            )
    return shapes


@dataclass(frozen=True, slots=True, init=False)
class Chain:
    """Steps that run one after another: the first tasks of each step wait for every last
    task of the step before it. Made by `chain(...)` (and `chord(...)`).

    Attributes:
        steps: The steps, in the order they run.
    """

    steps: tuple[Shape, ...]

    def __init__(self, steps: Iterable[Shape]) -> None:
        object.__setattr__(self, "steps", _checked("chain", steps))


@dataclass(frozen=True, slots=True, init=False)
class Group:
    """Members that run side by side, with no order between them. Made by `group(...)`.

    Attributes:
        members: The members; their tasks are listed (and their ids returned) in this order.
    """

    members: tuple[Shape, ...]

    def __init__(self, members: Iterable[Shape]) -> None:
        object.__setattr__(self, "members", _checked("group", members))


def chain(*steps: Shape) -> Chain:
    """Steps that run one after another: each waits for the one before it to succeed.

    A step that is a group waits as a whole: the step after it starts once every member has
    succeeded (that is a chord), and each member's first task waits for the step before.

    Raises:
        ValueError: No steps.
        TypeError: A step is not a NewTask, chain or group.
    """
    return Chain(steps)


def group(*members: Shape) -> Group:
    """Members that run side by side (in parallel, as workers are free).

    Raises:
        ValueError: No members.
        TypeError: A member is not a NewTask, chain or group.
    """
    return Group(members)


def chord(header: Group | Iterable[Shape], callback: Shape) -> Chain:
    """Fan-out, then fan-in: `callback` runs once every member of `header` has succeeded, and
    its handler gets their results, in member order, in `ctx.parent_results`.

    The same as `chain(group(*header), callback)`.

    Args:
        header: A group, or the members of one.
        callback: What runs after them (a task, or a shape whose first tasks wait for them).

    Raises:
        ValueError: The header has no members.
        TypeError: A member or the callback is not a NewTask, chain or group.
    """
    members = header if isinstance(header, Group) else Group(header)
    return Chain((members, *_checked("chord", (callback,))))


@dataclass(frozen=True, slots=True)
class Layout:
    """A workflow as the Enqueue call sends it.

    Attributes:
        tasks: Every task, in the order the shape lists them (parents before their children).
        parents: For each task, the positions in `tasks` of the tasks it waits for.
        last: The positions of the tasks no other task of the workflow waits for.
    """

    tasks: tuple[NewTask, ...]
    parents: tuple[tuple[int, ...], ...]
    last: tuple[int, ...]


def layout(shape: Shape) -> Layout:
    """Lays a shape out as a list of tasks and the positions each waits for.

    Raises:
        TypeError: `shape` is not a NewTask, chain or group.
    """
    (shape,) = _checked("enqueue_workflow", (shape,))
    tasks: list[NewTask] = []
    parents: list[tuple[int, ...]] = []

    def place(part: Shape, after: tuple[int, ...]) -> tuple[int, ...]:
        """Adds a part whose first tasks wait for `after`; returns its last tasks."""
        if isinstance(part, NewTask):
            tasks.append(part)
            parents.append(after)
            return (len(tasks) - 1,)
        if isinstance(part, Chain):
            for step in part.steps:
                after = place(step, after)
            return after
        return tuple(last for member in part.members for last in place(member, after))

    last = place(shape, ())
    return Layout(tuple(tasks), tuple(parents), last)


@dataclass(frozen=True, slots=True)
class EnqueuedWorkflow:
    """What `Client.enqueue_workflow` enqueued.

    Attributes:
        task_ids: Every task's id, in the order the shape lists its tasks (a chain's steps in
            order, a group's members in order, nested shapes in place). An id whose
            `.duplicate` is True matched an earlier task's idempotency key.
        last_ids: The tasks no other task of the workflow waits for: the last step's (several
            when the workflow ends in a group).
    """

    task_ids: tuple[TaskId, ...]
    last_ids: tuple[TaskId, ...]

    @property
    def last(self) -> TaskId:
        """The one task the workflow ends with; wait for it to know the workflow is done.

        Raises:
            ValueError: The workflow ends with several tasks (a group): use `last_ids`.
        """
        if len(self.last_ids) != 1:
            raise ValueError(
                f"the workflow ends with {len(self.last_ids)} tasks (a group): use last_ids"
            )
        return self.last_ids[0]
