"""Authorizer: whether the current principal holds a role on a queue, under the policy in force."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from broker.auth.policy_file import PolicyFile
from broker.auth.principal import Principal, Role, current_principal
from broker.errors import PermissionDenied


class Authorizer:
    """Answers for the principal of the call being served (`current_principal`). Without a
    policy every check passes and every filter keeps everything, as before policies existed.
    Every refusal goes to `on_denied` (the audit trail) before it is raised."""

    def __init__(
        self,
        policy: PolicyFile | None,
        on_denied: Callable[[Principal, PermissionDenied], None] | None = None,
    ) -> None:
        self._policy = policy
        self._on_denied = on_denied

    @property
    def enforced(self) -> bool:
        return self._policy is not None

    def require(self, roles: Role | Iterable[Role], queues: Iterable[str], action: str) -> None:
        """Checks every queue before anything is done; one role of `roles` on each suffices.

        Raises:
            PermissionDenied: naming the first queue denied and the role needed.
        """
        if self._policy is None:
            return
        wanted = (roles,) if isinstance(roles, Role) else tuple(roles)
        policy = self._policy.current()
        principal = current_principal.get()
        for queue in queues:
            if not any(policy.allows(principal, role, queue) for role in wanted):
                raise self.denied(
                    PermissionDenied(
                        principal.name, " or ".join(r.value for r in wanted), queue, action
                    )
                )

    def denied(self, error: PermissionDenied) -> PermissionDenied:
        """Reports a refusal of the current principal (to be raised or answered) and returns
        it; for refusals decided elsewhere too (a lease held by another principal)."""
        if self._on_denied is not None:
            self._on_denied(current_principal.get(), error)
        return error

    def permitted(self, queue: str, roles: Iterable[Role] = tuple(Role)) -> bool:
        """Whether the principal holds one of `roles` (by default: any role) on the queue; for
        lists that show only what the principal may see."""
        if self._policy is None:
            return True
        policy = self._policy.current()
        principal = current_principal.get()
        return any(policy.allows(principal, role, queue) for role in roles)

    def may_somewhere(self, principal: Principal, role: Role) -> bool:
        """Whether the principal holds the role on some queue (calls that name no queue)."""
        return self._policy is None or self._policy.current().may_somewhere(principal, role)
