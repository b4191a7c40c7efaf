"""Principal: the identity a call was authenticated as, and the one the current call runs as."""

from __future__ import annotations

import contextvars
import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    """What a principal may do on the queues a grant names."""

    #: Enqueue; read, watch and cancel tasks of those queues.
    PRODUCE = "produce"
    #: Lease tasks of those queues and settle or extend the leases.
    CONSUME = "consume"
    #: Stats, queue lists, task and dead-letter reads, the dashboard's views.
    READ = "read"
    #: AdminService and the dashboard's actions: pause, resume, redrive, delete.
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """A caller: `name` is the policy's name for it; `via` says how it proved it."""

    name: str
    via: str  # "token", "certificate", or "none" when no policy is configured

    @property
    def is_anonymous(self) -> bool:
        return self.via == "none"

    @property
    def scope(self) -> str:
        """What leases and idempotency keys are bound to: the name, or '' for ANONYMOUS, so
        a broker without a policy stores exactly what it stored before policies existed."""
        return "" if self.is_anonymous else self.name


#: Every caller when the broker runs without a policy file (loopback development, or
#: --insecure): no credential is asked for and every role is granted.
ANONYMOUS = Principal("anonymous", "none")

#: The principal of the call being served; set by the server's handlers before the method
#: runs, so services and the stores below them read it without threading it through.
current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "current_principal", default=ANONYMOUS
)
