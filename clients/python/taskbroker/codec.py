"""Opt-in JSON payloads: compact UTF-8 JSON that workers in any language can read.

Payloads are bytes everywhere in the SDK; these helpers are for producers and handlers that
agree to exchange JSON::

    await client.enqueue("emails", "send_welcome_email", json_payload({"user_id": 42}))
    ...
    data = from_json(payload)
"""

from __future__ import annotations

import json
from typing import Any


def json_payload(value: object) -> bytes:
    """Encodes a value as a JSON payload.

    The encoding is compact (separators "," and ":", no spaces), UTF-8, with non-ASCII characters
    written as themselves rather than \\u escapes. NaN and infinities are refused, since they are
    not JSON and other languages' parsers reject them.

    Args:
        value: Anything `json.dumps` accepts: dicts, lists, str, int, float, bool, None.

    Returns:
        The UTF-8 bytes of the JSON text.

    Raises:
        TypeError: The value contains something JSON cannot represent.
        ValueError: The value contains NaN or an infinity, or a circular reference.
    """
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def from_json(payload: bytes) -> Any:
    """Decodes a JSON payload.

    Args:
        payload: UTF-8 JSON text, as `json_payload` writes it.

    Returns:
        The decoded value (dict, list, str, int, float, bool or None).

    Raises:
        UnicodeDecodeError: The payload is not UTF-8.
        json.JSONDecodeError: The payload is not JSON (a ValueError).
    """
    return json.loads(payload.decode("utf-8"))
