"""The encrypted-payload envelope's byte layout: build and parse its header; its associated data.

This module has no dependency on a crypto library, so anything that only needs to recognize an
envelope (the broker's dashboard, a log scrubber) can import it. docs/encryption.md is the
language-neutral specification; this is its Python reading:

    offset      size  field
    0           4     magic: 0x89 'T' 'B' 'E'
    4           1     version: 1
    5           1     flags: bit 0 set = the plaintext was zlib-compressed; other bits 0
    6           1     key id length L, 1-64
    7           L     key id, ASCII [A-Za-z0-9_.-]
    7+L         12    nonce
    19+L        n     AES-256-GCM ciphertext of the (maybe compressed) plaintext
    19+L+n      16    GCM tag
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Final, Literal

#: 0x89 starts no ASCII or UTF-8 text (it is a UTF-8 continuation byte), so a JSON or text
#: payload is never mistaken for an envelope; "TBE" names it in a hex dump (as PNG's 0x89 "PNG").
MAGIC: Final = b"\x89TBE"
VERSION: Final = 1
#: flags bit 0: the plaintext was compressed with zlib (RFC 1950) before encryption.
FLAG_ZLIB: Final = 0x01
KNOWN_FLAGS: Final = FLAG_ZLIB
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
KEY_BYTES: Final = 32
MAX_KEY_ID_LENGTH: Final = 64
KEY_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: The smallest envelope: a 1-character key id and an empty ciphertext.
MIN_ENVELOPE_BYTES: Final = len(MAGIC) + 3 + 1 + NONCE_BYTES + TAG_BYTES
#: Associated-data purposes: a payload cannot be passed off as a result, nor the reverse.
PURPOSE_PAYLOAD: Final = 1
PURPOSE_RESULT: Final = 2


class CodecError(Exception):
    """A payload or result could not be encoded or decoded. Messages never hold key material
    or plaintext; they name the key id, queue, type and task where known."""


class MalformedEnvelopeError(CodecError):
    """The bytes start like an envelope but are not a valid one (truncated, unknown version)."""


class PlaintextRefusedError(CodecError):
    """The bytes are not an envelope and the codec does not allow plaintext."""


class UnknownKeyError(CodecError):
    """The envelope names a key id the keyring does not hold."""

    def __init__(self, message: str, key_id: str) -> None:
        super().__init__(message)
        self.key_id = key_id


class DecryptionError(CodecError):
    """The GCM tag did not verify: wrong key, tampered bytes, or bytes moved to another queue,
    task type or task (the associated data differs)."""

    def __init__(self, message: str, key_id: str) -> None:
        super().__init__(message)
        self.key_id = key_id


@dataclass(frozen=True, slots=True)
class CodecContext:
    """Where a value belongs; bound into the ciphertext as associated data.

    Attributes:
        purpose: "payload" (set by the producer) or "result" (set by the worker's ack).
        queue: The task's queue.
        type: The task's type.
        task_id: The task's id, for results only: a producer encrypts the payload before the
            broker has assigned an id, so payloads are bound to queue and type alone.
        idempotency_key: The task's idempotency key, for payloads (not part of the associated
            data): with one, the nonce is derived rather than random, so that resending the
            same task encrypts to the same bytes and the broker's duplicate check matches.
    """

    purpose: Literal["payload", "result"]
    queue: str
    type: str
    task_id: str = ""
    idempotency_key: str = ""

    @classmethod
    def payload(cls, queue: str, type: str, idempotency_key: str = "") -> CodecContext:
        return cls("payload", queue, type, idempotency_key=idempotency_key)

    @classmethod
    def result(cls, queue: str, type: str, task_id: str) -> CodecContext:
        return cls("result", queue, type, task_id)

    def describe(self) -> str:
        """For error messages: no payload bytes, only where the value belongs."""
        where = f"queue {self.queue!r}, type {self.type!r}"
        if self.task_id:
            return f"the {self.purpose} of task {self.task_id} ({where})"
        return f"a {self.purpose} ({where})"


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """An envelope's clear part: enough to say "encrypted, key k2, N bytes" without a key.

    Attributes:
        version: The format version (1).
        flags: FLAG_ZLIB or 0.
        key_id: The id of the key that encrypted it.
        size: The whole envelope's length in bytes.
        header: The header's raw bytes (magic to key id), part of the associated data.
    """

    version: int
    flags: int
    key_id: str
    size: int
    header: bytes

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_ZLIB)


def is_envelope(data: bytes) -> bool:
    """Whether the bytes start with the envelope magic (they may still be malformed)."""
    return data[: len(MAGIC)] == MAGIC


def check_key_id(key_id: str) -> str:
    """Returns the key id if it is 1-64 characters of [A-Za-z0-9_.-].

    Raises:
        ValueError: It is not.
    """
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise ValueError(f"key id {key_id!r}: use 1-64 characters of [A-Za-z0-9_.-]")
    return key_id


def build_header(key_id: str, flags: int) -> bytes:
    """The header bytes for a new envelope (the key id must have passed `check_key_id`)."""
    encoded = key_id.encode("ascii")
    return MAGIC + bytes((VERSION, flags, len(encoded))) + encoded


def parse_header(data: bytes) -> EnvelopeHeader:
    """Reads an envelope's header.

    Raises:
        PlaintextRefusedError: The bytes do not start with the magic.
        MalformedEnvelopeError: They do, but the rest is not a version-1 envelope.
    """
    if not is_envelope(data):
        raise PlaintextRefusedError("not an encrypted envelope")
    if len(data) < MIN_ENVELOPE_BYTES:
        raise MalformedEnvelopeError(f"envelope truncated ({len(data)} bytes)")
    version, flags, key_len = data[4], data[5], data[6]
    if version != VERSION:
        raise MalformedEnvelopeError(f"envelope version {version} is not supported (1 is)")
    if flags & ~KNOWN_FLAGS:
        raise MalformedEnvelopeError(f"envelope flags 0x{flags:02x} are not supported")
    end = 7 + key_len
    if not 1 <= key_len <= MAX_KEY_ID_LENGTH or len(data) < end + NONCE_BYTES + TAG_BYTES:
        raise MalformedEnvelopeError("envelope key id length is out of range")
    try:
        key_id = check_key_id(data[7:end].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise MalformedEnvelopeError("envelope key id is not [A-Za-z0-9_.-]") from None
    return EnvelopeHeader(version, flags, key_id, len(data), data[:end])


def associated_data(header: bytes, context: CodecContext) -> bytes:
    """The GCM associated data: the header, then the purpose and the length-prefixed queue,
    type and task id (UTF-8, 2-byte big-endian lengths), so no two contexts encode alike."""
    parts = [header, bytes((PURPOSE_PAYLOAD if context.purpose == "payload" else PURPOSE_RESULT,))]
    for text in (context.queue, context.type, context.task_id):
        encoded = text.encode("utf-8")
        parts.append(struct.pack(">H", len(encoded)) + encoded)
    return b"".join(parts)
