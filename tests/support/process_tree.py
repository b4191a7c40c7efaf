"""What the kernel says about processes and their TCP connections (/proc, Linux): a process's
children, whether a process still runs, and which process accepted a given connection."""

from __future__ import annotations

import os
from pathlib import Path

ESTABLISHED = "01"


def children(pid: int) -> dict[int, str]:
    """The live children of pid: their pid and command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def running(pid: int) -> bool:
    """The process exists and is not a zombie (one reparented to a PID 1 that never reaps
    its children stays a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


def _connections() -> list[tuple[int, int, int]]:
    """(local port, remote port, socket inode) of every established TCP connection."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == ESTABLISHED:
                rows.append(
                    (int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16), int(f[9]))
                )
    return rows


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def client_ports(server_port: int) -> set[int]:
    """The local ports of this process's established connections to server_port."""
    mine = _socket_inodes(os.getpid())
    return {
        local for local, remote, inode in _connections() if remote == server_port and inode in mine
    }


def accepted_by(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """Which of pids holds the server side of the connection from client_port to server_port."""
    inodes = {
        inode
        for local, remote, inode in _connections()
        if local == server_port and remote == client_port
    }
    for pid in pids:
        if inodes & _socket_inodes(pid):
            return pid
    return None


def connections_by_process(server_port: int, pids: list[int]) -> dict[int, int]:
    """How many established connections to server_port each of pids holds."""
    on_port = {inode for local, _, inode in _connections() if local == server_port}
    return {pid: len(on_port & _socket_inodes(pid)) for pid in pids}
