"""ProcessSlot: which of a supervisor's serving processes this one is (`--processes N`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ProcessSlot:
    """One serving process of N on the same gRPC port (broker/supervisor.py starts them).

    Process 0 serves the HTTP side (dashboard, /metrics, /healthz) and gathers the in-process
    series of the others, which each answer on a Unix socket in `peer_dir` (a directory only
    the broker's user may enter).
    """

    #: 0 .. count-1; process 0 serves HTTP.
    index: int
    #: How many processes serve the port.
    count: int
    #: Holds one Unix socket per process, `process-<index>.sock`.
    peer_dir: Path

    @property
    def serves_http(self) -> bool:
        return self.index == 0

    def socket_path(self, index: int) -> Path:
        """The Unix socket on which process `index` answers with its in-process series."""
        return self.peer_dir / f"process-{index}.sock"

    @property
    def peer_sockets(self) -> list[Path]:
        """The sockets of every other process."""
        return [self.socket_path(i) for i in range(self.count) if i != self.index]
