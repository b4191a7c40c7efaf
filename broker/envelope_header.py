"""What the broker may know of an encrypted payload or result: that it is an envelope
(docs/encryption.md) and the id of the key that sealed it, read from its clear header. The
broker holds no key and never decrypts; the SDKs own the rest of the format."""

from __future__ import annotations

import re
from typing import Final

#: The envelope's first bytes (docs/encryption.md, "The envelope"); tests pin it to the SDK's.
MAGIC: Final = b"\x89TBE"
VERSION: Final = 1
#: magic, version, flags, key id length, then the key id.
KEY_ID_OFFSET: Final = len(MAGIC) + 3
KEY_ID: Final = re.compile(rb"[A-Za-z0-9_.-]{1,64}")


def envelope_key_id(data: bytes) -> str | None:
    """The key id of a version-1 envelope; None for anything else (plaintext, or bytes that
    only look like an envelope)."""
    if not data.startswith(MAGIC) or len(data) < KEY_ID_OFFSET or data[4] != VERSION:
        return None
    key_id = data[KEY_ID_OFFSET : KEY_ID_OFFSET + data[6]]
    return key_id.decode("ascii") if KEY_ID.fullmatch(key_id) else None
