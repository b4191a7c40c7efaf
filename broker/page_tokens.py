"""Page tokens: opaque to clients (AIP-158), each kind tagged so that a token of one list is
INVALID_ARGUMENT on another; shared by the gRPC API, the HTTP API and the audit trail."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Final

from broker.errors import InvalidArgument
from broker.ids import GROUP_KEY_PATTERN, LOCAL_ID_PATTERN

#: An audit record's id, a Redis stream entry id "<ms>-<seq>": what an audit page token carries.
AUDIT_RECORD_ID: Final = re.compile(r"\d{1,20}-\d{1,20}")


def encode_page_token(cursor: tuple[int, str]) -> str:
    return base64.urlsafe_b64encode(f"{cursor[0]}:{cursor[1]}".encode()).decode()


def encode_queue_token(last: str) -> str:
    return base64.urlsafe_b64encode(f"q:{last}".encode()).decode() if last else ""


def decode_queue_token(token: str) -> str:
    """The queue name a queue page token continues after ('' for none); INVALID_ARGUMENT for
    a token this API did not return."""
    if not token:
        return ""
    try:
        kind, _, last = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind == "q" and last:
            return last
    except (ValueError, binascii.Error, UnicodeDecodeError):
        pass
    raise InvalidArgument("page_token", "not a token this API returned")


def decode_page_token(token: str) -> tuple[int, str] | None:
    """Page tokens are opaque to clients (AIP-158); a malformed one is INVALID_ARGUMENT."""
    if not token:
        return None
    try:
        ms, _, local_id = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if int(ms) >= 0 and LOCAL_ID_PATTERN.fullmatch(local_id):
            return int(ms), local_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        pass
    raise InvalidArgument("page_token", "not a token this API returned")


def encode_audit_token(record_id: str) -> str:
    return base64.urlsafe_b64encode(f"a:{record_id}".encode()).decode()


def decode_audit_token(token: str) -> str | None:
    """The stream id a page token continues before (None: the newest); INVALID_ARGUMENT for a
    token this API did not return."""
    if not token:
        return None
    try:
        kind, _, record_id = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind == "a" and AUDIT_RECORD_ID.fullmatch(record_id):
            return record_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        pass
    raise InvalidArgument("page_token", "not a token this API returned")


def encode_group_key_token(cursor: tuple[int, str] | None) -> str:
    """A group-key page token: the (pending, key) of the page's last key ('' for none)."""
    if cursor is None:
        return ""
    return base64.urlsafe_b64encode(f"k:{cursor[0]}:{cursor[1]}".encode()).decode()


def decode_group_key_token(token: str) -> tuple[int, str] | None:
    """The (pending, key) a group-key page continues after (None: the first page);
    INVALID_ARGUMENT for a token this API did not return."""
    if not token:
        return None
    try:
        kind, pending, key = base64.urlsafe_b64decode(token.encode()).decode().split(":", 2)
        if kind == "k" and pending.isdigit() and GROUP_KEY_PATTERN.fullmatch(key):
            return int(pending), key
    except (ValueError, binascii.Error, UnicodeDecodeError):
        pass
    raise InvalidArgument("page_token", "not a token this API returned")


def encode_schedule_token(last: str) -> str:
    return base64.urlsafe_b64encode(f"s:{last}".encode()).decode() if last else ""


def decode_schedule_token(token: str) -> str:
    """The name a page continues after ('' for none); INVALID_ARGUMENT for a token that is
    not a schedule page token."""
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    if not text.startswith("s:") or len(text) < 3:
        raise InvalidArgument("page_token", "not a page token of ListSchedules")
    return text[2:]
