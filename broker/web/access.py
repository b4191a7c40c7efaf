"""Who may use the HTTP side: the Host allow-list (DNS rebinding), the /metrics token, and the
dashboard's login sessions and CSRF tokens. The rules are in docs/security.md, "Dashboard and
HTTP"."""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from aiohttp import web

#: The session cookie. HttpOnly and SameSite=Strict always, Secure when served over TLS.
SESSION_COOKIE: Final = "tb_session"
#: The header every state-changing request of a logged-in page carries (from /api/info).
CSRF_HEADER: Final = "X-CSRF-Token"
#: Paths served without a login (the login page itself and what it loads).
PUBLIC_PATHS: Final = frozenset({"/login", "/api/login"})
PUBLIC_PREFIXES: Final = ("/static/",)


def host_name(host: str) -> str:
    """The name of a Host header, without its port or IPv6 brackets, lowercase."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


def host_allowed(request: web.Request, allowed: frozenset[str] | None) -> bool:
    return allowed is None or host_name(request.headers.get("Host", "")) in allowed


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def bearer_matches(request: web.Request, expected: str) -> bool:
    """Whether the request's `Authorization: Bearer` token is `expected` (compared by digest
    in constant time, so neither its length nor its prefix leaks through timing)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    given = hashlib.sha256(token.strip().encode()).digest()
    return hmac.compare_digest(given, hashlib.sha256(expected.encode()).digest())


def csrf_matches(request: web.Request, expected: str) -> bool:
    given = request.headers.get(CSRF_HEADER, "")
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def session_cookie(
    response: web.StreamResponse, request: web.Request, value: str, ttl_s: int
) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=ttl_s,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )


def clear_session_cookie(response: web.StreamResponse, request: web.Request) -> None:
    response.del_cookie(
        SESSION_COOKIE, path="/", secure=request.secure, httponly=True, samesite="Strict"
    )
