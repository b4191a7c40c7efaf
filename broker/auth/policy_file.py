"""PolicyFile: the policy as the file says it now, re-read when the file changes, so grants
and tokens change without a restart."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from broker.auth.policy import Policy, PolicyError, read_policy

log = logging.getLogger(__name__)

#: How often at most the file's stat is checked; calls in between use the policy in hand.
CHECK_INTERVAL_S = 1.0


class PolicyFile:
    """Reads the policy at construction (a broken file stops the start: PolicyError), then
    again whenever its size, mtime or inode changes, or those of the JWT keys file it names.
    A broken edit keeps the policy in force and logs why, so a typo never opens or closes the
    broker to everyone."""

    def __init__(self, path: Path, check_interval_s: float = CHECK_INTERVAL_S) -> None:
        self._path = path
        self._check_interval_s = check_interval_s
        self._policy = read_policy(path)
        self._signature = self._stat()
        self._checked_at = time.monotonic()

    @property
    def path(self) -> Path:
        return self._path

    def current(self) -> Policy:
        now = time.monotonic()
        if now - self._checked_at >= self._check_interval_s:
            self._checked_at = now
            self.reload_if_changed()
        return self._policy

    def reload_if_changed(self) -> bool:
        """Re-reads the file if it changed; True when a new policy is in force."""
        signature = self._stat()
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            self._policy = read_policy(self._path)
        except PolicyError as exc:
            log.error("policy file not reloaded, the previous policy stays in force: %s", exc)
            return False
        self._signature = self._stat()  # the new policy may name other files
        log.info("policy file %s reloaded", self._path)
        return True

    def _stat(self) -> tuple[tuple[int, int, int] | None, ...]:
        """The file's identity, and that of each file it names (the JWT keys): an edit of any
        of them reloads the policy."""
        return tuple(_signature(p) for p in (self._path, *self._policy.depends_on))


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
