"""The lifecycle of one worker run: one state, its allowed transitions, and the stop request."""

from __future__ import annotations

import asyncio
import enum
from typing import Final


class WorkerState(enum.Enum):
    """Where a worker run is. It only moves forward, along `TRANSITIONS`."""

    #: Streams are open (or being opened) and granted credits for free slots.
    RUNNING = "running"
    #: Stopping: no more credits; running tasks get the grace period to finish.
    DRAINING = "draining"
    #: The grace period is over: unfinished handlers are cancelled and their nacks sent.
    ABORTING = "aborting"
    #: The streams are being closed: late deliveries are left to the broker.
    CLOSING = "closing"
    #: Everything is closed.
    STOPPED = "stopped"


#: The states each state may move to. DRAINING skips ABORTING when every task finished in time;
#: any state may end in STOPPED, since a failure while stopping still ends the run.
TRANSITIONS: Final[dict[WorkerState, frozenset[WorkerState]]] = {
    WorkerState.RUNNING: frozenset({WorkerState.DRAINING, WorkerState.STOPPED}),
    WorkerState.DRAINING: frozenset(
        {WorkerState.ABORTING, WorkerState.CLOSING, WorkerState.STOPPED}
    ),
    WorkerState.ABORTING: frozenset({WorkerState.CLOSING, WorkerState.STOPPED}),
    WorkerState.CLOSING: frozenset({WorkerState.STOPPED}),
    WorkerState.STOPPED: frozenset(),
}

#: States in which a handler that has not started yet must not start.
_ABORTED: Final = frozenset({WorkerState.ABORTING, WorkerState.CLOSING, WorkerState.STOPPED})


class Lifecycle:
    """The state of one worker run, and the events something awaits: the stop request, the
    request to skip the grace period (a second signal), and the end of the run."""

    def __init__(self) -> None:
        self._state = WorkerState.RUNNING
        #: Set by `request_stop`; the run then begins to drain.
        self.stop_requested = asyncio.Event()
        #: Set by a second signal: skip what is left of the grace period.
        self.hurry = asyncio.Event()
        #: Set once the run reached STOPPED.
        self.stopped = asyncio.Event()

    @property
    def state(self) -> WorkerState:
        return self._state

    def advance(self, to: WorkerState) -> None:
        """Moves to `to`.

        Raises:
            RuntimeError: `to` does not follow the current state.
        """
        if to not in TRANSITIONS[self._state]:
            raise RuntimeError(f"worker state cannot go from {self._state.name} to {to.name}")
        self._state = to
        if to is WorkerState.STOPPED:
            self.stopped.set()

    def request_stop(self, *, hurry: bool = False) -> None:
        self.stop_requested.set()
        if hurry:
            self.hurry.set()

    @property
    def granting(self) -> bool:
        """Whether free slots are granted to the broker as credits."""
        return self._state is WorkerState.RUNNING

    @property
    def aborted(self) -> bool:
        """Whether a handler that has not started yet is failed instead of run."""
        return self._state in _ABORTED

    @property
    def accepting(self) -> bool:
        """Whether deliveries are run (once closing, the broker takes them back)."""
        return self._state not in (WorkerState.CLOSING, WorkerState.STOPPED)
