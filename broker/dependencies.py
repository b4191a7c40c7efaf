"""Task dependencies as an Enqueue call states them (issue 17): checks the graph and orders it.

A task names its parents by id (tasks stored before) or by position in the same call. The
positions must form a DAG; the call is stored in waves, each wave's tasks depending only on
tasks of earlier waves, so a parent's real id (an idempotency duplicate's is another task's)
is known before its children are stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

from broker.errors import InvalidArgument
from broker.ids import parse_task_id

#: Parents of one task, by id and by position together. A fan-in of more gets another level.
MAX_PARENTS: Final = 1000


class Dependent(Protocol):
    """What a task request says about its parents (queue.TaskRequest)."""

    @property
    def depends_on(self) -> tuple[str, ...]: ...

    @property
    def depends_on_positions(self) -> tuple[int, ...]: ...


def check_parent_ids(requests: Sequence[Dependent]) -> None:
    """Parses every parent id, so a malformed one names its field.

    Raises:
        InvalidArgument: tasks[i].depends_on[j] is not a task id, or a task names too many
            parents, or one twice.
    """
    for i, r in enumerate(requests):
        if len(r.depends_on) + len(r.depends_on_positions) > MAX_PARENTS:
            raise InvalidArgument(f"tasks[{i}].depends_on", f"at most {MAX_PARENTS:,} parents")
        for j, parent in enumerate(r.depends_on):
            parse_task_id(f"tasks[{i}].depends_on[{j}]", parent)
        if len(set(r.depends_on)) != len(r.depends_on):
            raise InvalidArgument(f"tasks[{i}].depends_on", "names a task twice")


def waves(requests: Sequence[Dependent]) -> list[list[int]]:
    """The positions of the call in storing order: every task after the tasks it names by
    position (Kahn's algorithm). One wave when no task names another of the call.

    Raises:
        InvalidArgument: a position out of range, a task naming itself or one position twice,
            or a cycle.
    """
    n = len(requests)
    children: list[list[int]] = [[] for _ in range(n)]
    unmet = [0] * n
    for i, r in enumerate(requests):
        field = f"tasks[{i}].depends_on_positions"
        if len(set(r.depends_on_positions)) != len(r.depends_on_positions):
            raise InvalidArgument(field, "names a position twice")
        for position in r.depends_on_positions:
            if not 0 <= position < n:
                raise InvalidArgument(
                    field, f"{position} is not a position of this call (0-{n - 1})"
                )
            if position == i:
                raise InvalidArgument(field, "a task cannot depend on itself")
            children[position].append(i)
            unmet[i] += 1
    order: list[list[int]] = []
    wave = [i for i in range(n) if unmet[i] == 0]
    placed = 0
    while wave:
        order.append(wave)
        placed += len(wave)
        following = []
        for parent in wave:
            for child in children[parent]:
                unmet[child] -= 1
                if unmet[child] == 0:
                    following.append(child)
        wave = sorted(following)
    if placed < n:
        stuck = [i for i in range(n) if unmet[i] > 0]
        raise InvalidArgument(
            f"tasks[{stuck[0]}].depends_on_positions",
            f"the dependencies form a cycle (through positions {', '.join(map(str, stuck[:10]))})",
        )
    return order
