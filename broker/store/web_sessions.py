"""WebSessions: the dashboard's login sessions in Redis, so any replica accepts a session another
replica made, and each ends on its own with its TTL."""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import asdict, dataclass

from broker.store.keys import WEB_SESSION_PREFIX
from broker.store.redis_store import AnyRedis, _translate


@dataclass(frozen=True, slots=True)
class WebSession:
    """A logged-in browser: the principal, the SHA-256 of the token it logged in with (so a
    token removed from the policy ends its sessions), and the session's CSRF token."""

    principal: str
    token_sha256: str
    csrf_token: str


def _key(session_id: str) -> str:
    # Stored by digest: a copy of Redis's data holds no cookie a thief could replay.
    return WEB_SESSION_PREFIX + hashlib.sha256(session_id.encode()).hexdigest()


class WebSessions:
    def __init__(self, client: AnyRedis, ttl_s: float) -> None:
        self._client = client
        self._ttl_ms = max(1, round(ttl_s * 1000))

    @property
    def ttl_s(self) -> int:
        return max(1, self._ttl_ms // 1000)

    async def create(self, principal: str, token_sha256: str) -> tuple[str, WebSession]:
        """A new session: its id (the cookie's value, 256 random bits) and its record."""
        session_id = secrets.token_urlsafe(32)
        session = WebSession(principal, token_sha256, secrets.token_urlsafe(32))
        with _translate():
            await self._client.set(_key(session_id), json.dumps(asdict(session)), px=self._ttl_ms)
        return session_id, session

    async def get(self, session_id: str) -> WebSession | None:
        if not session_id or len(session_id) > 128:
            return None
        with _translate():
            raw = await self._client.get(_key(session_id))
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return WebSession(
                str(data["principal"]), str(data["token_sha256"]), str(data["csrf_token"])
            )
        except (ValueError, KeyError, TypeError):
            return None

    async def delete(self, session_id: str) -> None:
        with _translate():
            await self._client.delete(_key(session_id))
