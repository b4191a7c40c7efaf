"""Payload codecs: encrypt payloads and results in the SDK so the broker only ever holds ciphertext.

```python
keyring = Keyring.from_env()                      # TASKBROKER_ENCRYPTION_KEYS="k1=<base64>,k2=..."
async with Client("broker:50051", codec=AesGcmCodec(keyring)) as client:
    task_id = await client.enqueue("billing", "charge", b'{"card": "..."}')  # sent encrypted
```

The envelope format is in `taskbroker.envelope` and docs/encryption.md. AES-256-GCM comes from
the `cryptography` package (`pip install taskbroker[encryption]`), imported only when an
`AesGcmCodec` is made, so the SDK works without it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

from taskbroker.envelope import (
    FLAG_ZLIB,
    KEY_BYTES,
    NONCE_BYTES,
    CodecContext,
    CodecError,
    DecryptionError,
    MalformedEnvelopeError,
    PlaintextRefusedError,
    UnknownKeyError,
    associated_data,
    build_header,
    check_key_id,
    is_envelope,
    parse_header,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: Environment variables `Keyring.from_env` reads.
KEYS_ENV: Final = "TASKBROKER_ENCRYPTION_KEYS"
ACTIVE_KEY_ENV: Final = "TASKBROKER_ENCRYPTION_ACTIVE_KEY"
KEYS_FILE_ENV: Final = "TASKBROKER_ENCRYPTION_KEYS_FILE"
#: Decompressed plaintexts larger than this are refused (a small envelope must not inflate into
#: gigabytes in a worker's memory).
DEFAULT_MAX_PLAINTEXT_BYTES: Final = 64 * 1024 * 1024
#: Derives the per-key secret of derived nonces (key separation: the AES key itself never
#: keys HMAC).
NONCE_KEY_LABEL: Final = b"taskbroker envelope v1 nonce key"


def derived_nonce(key: bytes, ad: bytes, idempotency_key: str, plaintext: bytes) -> bytes:
    """The nonce of a value with an idempotency key (docs/encryption.md, "Derived nonces"):
    HMAC-SHA256(HMAC-SHA256(key, label), ad | len16 + idempotency key | plaintext), first 12
    bytes. The same nonce only ever encrypts the same plaintext under the same AD, so GCM's
    rule (never two plaintexts under one key and nonce) holds; a resend is byte-identical."""
    nonce_key = hmac.new(key, NONCE_KEY_LABEL, hashlib.sha256).digest()
    idem = idempotency_key.encode("utf-8")
    message = ad + struct.pack(">H", len(idem)) + idem + plaintext
    return hmac.new(nonce_key, message, hashlib.sha256).digest()[:NONCE_BYTES]


@runtime_checkable
class PayloadCodec(Protocol):
    """Turns payloads and results into what the broker stores, and back.

    `encode` runs in the producer (payloads) and the worker (results); `decode` in the worker
    (payloads) and in `Client.get_task`/`wait` (payloads and results). Both raise `CodecError`.
    """

    def encode(self, data: bytes, context: CodecContext) -> bytes: ...

    def decode(self, data: bytes, context: CodecContext) -> bytes: ...


class Keyring:
    """Encryption keys by id, and which one encrypts new values.

    Old keys stay in the ring so that what they encrypted still decrypts; rotating means adding
    a new key everywhere first (workers and readers), then making it active on producers.

    Args:
        keys: Key id (1-64 characters of [A-Za-z0-9_.-]) → 32-byte key.
        active: The id of the key that encrypts new values. None: the last one given.

    Raises:
        ValueError: No keys, a malformed id, a key that is not 32 bytes, or an unknown active id.
    """

    def __init__(self, keys: Mapping[str, bytes], active: str | None = None) -> None:
        if not keys:
            raise ValueError("keyring: give at least one key")
        for key_id, key in keys.items():
            check_key_id(key_id)
            if len(key) != KEY_BYTES:
                raise ValueError(f"keyring: key {key_id!r} must be 32 bytes, not {len(key)}")
        self._keys = dict(keys)
        self.active = list(keys)[-1] if active is None else active
        if self.active not in self._keys:
            raise ValueError(f"keyring: the active key {self.active!r} is not in the ring")

    @property
    def key_ids(self) -> list[str]:
        """The ids held, in the order given."""
        return list(self._keys)

    def key(self, key_id: str) -> bytes | None:
        """The key with that id, or None."""
        return self._keys.get(key_id)

    @classmethod
    def parse(cls, text: str, active: str | None = None) -> Keyring:
        """Reads keys written as "<id>=<base64 of 32 bytes>", separated by commas or new lines;
        blank lines and lines starting with # are skipped. The active key defaults to the last.

        Raises:
            ValueError: A malformed entry (the message names its id, never the key).
        """
        keys: dict[str, bytes] = {}
        for raw in text.replace(",", "\n").splitlines():
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            key_id, sep, encoded = entry.partition("=")
            key_id = key_id.strip()
            if not sep:
                raise ValueError(f"keyring: entry {check_key_id(key_id)!r} has no '=<base64 key>'")
            try:
                keys[check_key_id(key_id)] = base64.b64decode(encoded.strip(), validate=True)
            except binascii.Error:
                raise ValueError(f"keyring: key {key_id!r} is not valid base64") from None
        return cls(keys, active)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], active: str | None = None) -> Keyring:
        """Reads a key file in the format of `parse` (keep it readable by its owner only)."""
        return cls.parse(Path(path).read_text(encoding="ascii"), active)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Keyring:
        """Reads TASKBROKER_ENCRYPTION_KEYS (or the file TASKBROKER_ENCRYPTION_KEYS_FILE names),
        and TASKBROKER_ENCRYPTION_ACTIVE_KEY (default: the last key).

        Raises:
            ValueError: Neither variable is set, or the keys are malformed.
        """
        env = os.environ if environ is None else environ
        active = env.get(ACTIVE_KEY_ENV) or None
        if text := env.get(KEYS_ENV):
            return cls.parse(text, active)
        if path := env.get(KEYS_FILE_ENV):
            return cls.from_file(path, active)
        raise ValueError(f"keyring: set {KEYS_ENV} or {KEYS_FILE_ENV}")

    @staticmethod
    def generate_entry(key_id: str) -> str:
        """A new random key as a line for a key file: "<id>=<base64>"."""
        return f"{check_key_id(key_id)}={base64.b64encode(os.urandom(KEY_BYTES)).decode()}"

    def __repr__(self) -> str:  # ids only: keys must never reach a log
        return f"Keyring(key_ids={self.key_ids!r}, active={self.active!r})"


class AesGcmCodec:
    """AES-256-GCM envelopes (docs/encryption.md), with a random 96-bit nonce per value (derived
    from the value for a payload with an idempotency key, so a resend is byte-identical).

    Args:
        keyring: The keys; new values use its active key.
        compress_min_bytes: Compress plaintexts of at least this many bytes with zlib before
            encrypting, when that makes them smaller. None (the default): never compress.
            Compression lets the ciphertext's length depend on the content: leave it off when
            attacker-chosen text is mixed with secrets in one payload.
        allow_plaintext: Decode bytes that are not an envelope as themselves (while migrating
            producers to encryption). False (the default): refuse them.
        max_plaintext_bytes: Refuse to decompress past this size.

    Raises:
        ImportError: The `cryptography` package is not installed.
        ValueError: compress_min_bytes or max_plaintext_bytes is negative.
    """

    def __init__(
        self,
        keyring: Keyring,
        *,
        compress_min_bytes: int | None = None,
        allow_plaintext: bool = False,
        max_plaintext_bytes: int = DEFAULT_MAX_PLAINTEXT_BYTES,
    ) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ImportError(
                "AesGcmCodec needs the cryptography package: pip install 'taskbroker[encryption]'"
            ) from exc
        if compress_min_bytes is not None and compress_min_bytes < 0:
            raise ValueError("compress_min_bytes must not be negative")
        if max_plaintext_bytes < 0:
            raise ValueError("max_plaintext_bytes must not be negative")
        self.keyring = keyring
        self._compress_min_bytes = compress_min_bytes
        self._allow_plaintext = allow_plaintext
        self._max_plaintext_bytes = max_plaintext_bytes
        self._aesgcm = AESGCM
        self._ciphers: dict[str, AESGCM] = {}

    def _cipher(self, key_id: str) -> AESGCM | None:
        cipher = self._ciphers.get(key_id)
        if cipher is None and (key := self.keyring.key(key_id)) is not None:
            cipher = self._ciphers[key_id] = self._aesgcm(key)
        return cipher

    def encode(self, data: bytes, context: CodecContext) -> bytes:
        """Encrypts a payload or result with the active key."""
        flags = 0
        plaintext = bytes(data)
        if self._compress_min_bytes is not None and len(plaintext) >= self._compress_min_bytes:
            compressed = zlib.compress(plaintext)
            if len(compressed) < len(plaintext):
                plaintext, flags = compressed, FLAG_ZLIB
        key_id = self.keyring.active
        cipher = self._cipher(key_id)
        assert cipher is not None  # the keyring checked that the active key exists
        header = build_header(key_id, flags)
        ad = associated_data(header, context)
        if context.idempotency_key:
            key = self.keyring.key(key_id)
            assert key is not None
            nonce = derived_nonce(key, ad, context.idempotency_key, plaintext)
        else:
            nonce = os.urandom(NONCE_BYTES)
        return header + nonce + cipher.encrypt(nonce, plaintext, ad)

    def decode(self, data: bytes, context: CodecContext) -> bytes:
        """Decrypts an envelope (or passes plaintext through, if allowed).

        Raises:
            PlaintextRefusedError: Not an envelope, and plaintext is not allowed.
            MalformedEnvelopeError: A truncated envelope, or of an unknown version.
            UnknownKeyError: The envelope's key id is not in the keyring.
            DecryptionError: The tag does not verify (wrong key, tampering, moved bytes), or
                the plaintext does not decompress within max_plaintext_bytes.
        """
        data = bytes(data)
        if not is_envelope(data):
            if self._allow_plaintext:
                return data
            raise PlaintextRefusedError(
                f"{context.describe()} is not encrypted ({len(data)} bytes without the envelope "
                "prefix) and this codec refuses plaintext (allow_plaintext=False)"
            )
        header = parse_header(data)
        cipher = self._cipher(header.key_id)
        if cipher is None:
            raise UnknownKeyError(
                f"{context.describe()} is encrypted with key {header.key_id!r}, which this "
                f"keyring does not hold (it holds {', '.join(self.keyring.key_ids)})",
                header.key_id,
            )
        start = len(header.header)
        nonce = data[start : start + NONCE_BYTES]
        from cryptography.exceptions import InvalidTag

        try:
            plaintext = cipher.decrypt(
                nonce, data[start + NONCE_BYTES :], associated_data(header.header, context)
            )
        except InvalidTag:
            raise DecryptionError(
                f"{context.describe()} does not decrypt with key {header.key_id!r}: the key "
                "differs from the encrypting one, or the bytes were altered or moved from "
                "another queue, type or task",
                header.key_id,
            ) from None
        return self._inflate(plaintext, header.key_id, context) if header.compressed else plaintext

    def _inflate(self, data: bytes, key_id: str, context: CodecContext) -> bytes:
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(data, self._max_plaintext_bytes + 1)
        except zlib.error:
            raise DecryptionError(
                f"{context.describe()} (key {key_id!r}) does not decompress", key_id
            ) from None
        if len(out) > self._max_plaintext_bytes or not inflater.eof:
            raise DecryptionError(
                f"{context.describe()} (key {key_id!r}) decompresses to more than "
                f"{self._max_plaintext_bytes} bytes, or is cut short",
                key_id,
            )
        return out

    def __repr__(self) -> str:
        return f"AesGcmCodec({self.keyring!r})"


__all__ = [
    "AesGcmCodec",
    "CodecContext",
    "CodecError",
    "DecryptionError",
    "Keyring",
    "MalformedEnvelopeError",
    "PayloadCodec",
    "PlaintextRefusedError",
    "UnknownKeyError",
]
