"""Authenticator: the principal a call runs as, from its bearer token or client certificate."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from broker.auth.policy_file import PolicyFile
from broker.auth.principal import ANONYMOUS, Principal
from broker.errors import Unauthenticated

#: Where grpc puts a verified client certificate's names in a call's auth context.
SAN_KEY = "x509_subject_alternative_name"
CN_KEY = "x509_common_name"
BEARER = "bearer "


class Authenticator:
    """Without a policy every call is ANONYMOUS (and every role is granted). With one, a call
    must carry a known bearer token or a client certificate the policy names; a token, when
    present, decides (a bad token is refused even over mTLS)."""

    def __init__(self, policy: PolicyFile | None) -> None:
        self._policy = policy

    @property
    def enforced(self) -> bool:
        return self._policy is not None

    def authenticate(
        self,
        metadata: Iterable[tuple[str, str | bytes]],
        auth_context: Mapping[str, Iterable[bytes]],
    ) -> Principal:
        if self._policy is None:
            return ANONYMOUS
        policy = self._policy.current()
        token = bearer_token(metadata)
        if token is not None:
            return policy.principal_for_bearer(token)
        names = [n.decode() for n in auth_context.get(SAN_KEY, ())]
        names += [n.decode() for n in auth_context.get(CN_KEY, ())]
        if names:
            principal = policy.principal_for_certificate(names)
            if principal is None:
                raise Unauthenticated("the client certificate names no principal in the policy")
            return principal
        raise Unauthenticated(
            "no credentials: send 'authorization: Bearer <token>' or a client certificate"
        )


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of an `authorization: Bearer <token>` entry; Unauthenticated for another
    scheme (the value is not echoed)."""
    for key, value in metadata:
        if key != "authorization":
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if not text.lower().startswith(BEARER) or not text[len(BEARER) :].strip():
            raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
        return text[len(BEARER) :].strip()
    return None
