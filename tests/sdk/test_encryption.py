"""The AES-256-GCM payload codec on its own: the envelope of docs/encryption.md, keyrings and
rotation, and every way a value can fail to decode (all with a clear error, none with plaintext
or key material in it)."""

from __future__ import annotations

import base64
import os
import zlib
from pathlib import Path

import pytest

from taskbroker import AesGcmCodec, Keyring, PayloadCodec
from taskbroker.encryption import (
    CodecContext,
    DecryptionError,
    MalformedEnvelopeError,
    PlaintextRefusedError,
    UnknownKeyError,
)
from taskbroker.envelope import FLAG_ZLIB, MAGIC, parse_header

K1 = bytes(range(32))
K2 = os.urandom(32)
PAYLOAD = CodecContext.payload("billing", "charge")
SECRET = b'{"card": "4111 1111 1111 1111", "amount": 42}'
#: docs/encryption.md's test vector: k1 = 0x00..0x1f, nonce 0x00..0x0b, {"amount":42}.
VECTOR = bytes.fromhex(
    "895442450100026b31000102030405060708090a0b3c20b776aa90ac6faf7ba3b9cca62ba9bc139d"
    "832864aba888d04e0f07"
)


def codec(active: str = "k1", **options: object) -> AesGcmCodec:
    return AesGcmCodec(Keyring({"k1": K1, "k2": K2}, active=active), **options)  # type: ignore[arg-type]


def test_round_trip_hides_the_plaintext_and_names_the_key() -> None:
    sealed = codec().encode(SECRET, PAYLOAD)

    assert sealed.startswith(MAGIC) and SECRET not in sealed
    header = parse_header(sealed)
    assert (header.version, header.key_id, header.compressed, header.size) == (
        1,
        "k1",
        False,
        len(SECRET) + 35 + 2,
    )
    assert codec().decode(sealed, PAYLOAD) == SECRET


def test_every_value_gets_a_fresh_nonce() -> None:
    c = codec()
    assert c.encode(SECRET, PAYLOAD) != c.encode(SECRET, PAYLOAD)


def test_with_an_idempotency_key_a_resend_encrypts_to_the_same_bytes() -> None:
    c = codec(compress_min_bytes=1)
    order = CodecContext.payload("billing", "charge", "order-1")

    sealed = c.encode(SECRET, order)
    assert c.encode(SECRET, order) == sealed  # the broker's duplicate check matches
    assert c.decode(sealed, PAYLOAD) == SECRET  # the key is not needed to decode
    # Another key, payload, queue or encryption key: another nonce.
    nonces = {
        v[9:21]  # after the 9-byte header of key id "k1" or "k2"
        for v in (
            sealed,
            c.encode(SECRET, CodecContext.payload("billing", "charge", "order-2")),
            c.encode(SECRET + b" ", order),
            c.encode(SECRET, CodecContext.payload("refunds", "charge", "order-1")),
            codec(active="k2").encode(SECRET, order),
        )
    }
    assert len(nonces) == 5


def test_empty_values_are_enveloped_too() -> None:
    sealed = codec().encode(b"", PAYLOAD)
    assert len(sealed) == 37
    assert codec().decode(sealed, PAYLOAD) == b""


def test_the_documented_test_vector_decrypts() -> None:
    assert codec().decode(VECTOR, PAYLOAD) == b'{"amount":42}'


def test_rotation_new_values_use_the_active_key_old_ones_still_decrypt() -> None:
    old = codec(active="k1").encode(SECRET, PAYLOAD)
    rotated = codec(active="k2")

    new = rotated.encode(SECRET, PAYLOAD)
    assert parse_header(new).key_id == "k2"
    assert rotated.decode(old, PAYLOAD) == SECRET
    assert rotated.decode(new, PAYLOAD) == SECRET


def test_a_key_missing_from_the_ring_is_named() -> None:
    sealed = codec(active="k2").encode(SECRET, PAYLOAD)
    only_k1 = AesGcmCodec(Keyring({"k1": K1}))

    with pytest.raises(UnknownKeyError) as info:
        only_k1.decode(sealed, PAYLOAD)
    assert info.value.key_id == "k2"
    message = str(info.value)
    assert "'k2'" in message and "it holds k1" in message and "'billing'" in message
    assert base64.b64encode(K1).decode() not in message


def test_the_wrong_key_under_the_same_id_fails_the_tag() -> None:
    sealed = codec().encode(SECRET, PAYLOAD)
    impostor = AesGcmCodec(Keyring({"k1": os.urandom(32)}))

    with pytest.raises(DecryptionError, match="does not decrypt with key 'k1'") as info:
        impostor.decode(sealed, PAYLOAD)
    assert info.value.key_id == "k1"


@pytest.mark.parametrize("position", [7, 9, 20, -1])  # key id, nonce, ciphertext, tag
def test_tampering_is_detected(position: int) -> None:
    sealed = bytearray(codec().encode(SECRET, PAYLOAD))
    sealed[position] ^= 0x01
    with pytest.raises((DecryptionError, UnknownKeyError, MalformedEnvelopeError)):
        codec().decode(bytes(sealed), PAYLOAD)


def test_flipping_the_compression_flag_is_detected() -> None:
    sealed = bytearray(codec().encode(SECRET, PAYLOAD))
    sealed[5] |= FLAG_ZLIB
    with pytest.raises(DecryptionError):
        codec().decode(bytes(sealed), PAYLOAD)


@pytest.mark.parametrize(
    "moved_to",
    [
        CodecContext.payload("other-queue", "charge"),
        CodecContext.payload("billing", "refund"),
        CodecContext.result("billing", "charge", "billing:01"),
    ],
    ids=["another queue", "another type", "as a result"],
)
def test_associated_data_binds_the_payload_to_queue_type_and_purpose(
    moved_to: CodecContext,
) -> None:
    sealed = codec().encode(SECRET, PAYLOAD)
    with pytest.raises(DecryptionError):
        codec().decode(sealed, moved_to)


def test_a_result_is_bound_to_its_task() -> None:
    sealed = codec().encode(b"ok", CodecContext.result("billing", "charge", "billing:A"))
    assert codec().decode(sealed, CodecContext.result("billing", "charge", "billing:A")) == b"ok"
    with pytest.raises(DecryptionError):
        codec().decode(sealed, CodecContext.result("billing", "charge", "billing:B"))


def test_compression_is_flagged_and_round_trips() -> None:
    big = b"the same line again\n" * 500
    c = codec(compress_min_bytes=1024)

    sealed = c.encode(big, PAYLOAD)
    assert parse_header(sealed).compressed
    assert len(sealed) < len(big) // 10
    assert c.decode(sealed, PAYLOAD) == big
    # Small values, and values that do not shrink, are left uncompressed.
    assert not parse_header(c.encode(b"short", PAYLOAD)).compressed
    assert not parse_header(c.encode(os.urandom(4096), PAYLOAD)).compressed
    # Off by default.
    assert not parse_header(codec().encode(big, PAYLOAD)).compressed


def test_decompression_is_bounded() -> None:
    bomb = b"\0" * 100_000
    sealed = codec(compress_min_bytes=1).encode(bomb, PAYLOAD)
    with pytest.raises(DecryptionError, match="decompresses to more than 1000 bytes"):
        codec(max_plaintext_bytes=1000).decode(sealed, PAYLOAD)
    assert len(zlib.compress(bomb)) < 1000  # the envelope itself was small


def test_plaintext_is_refused_unless_allowed() -> None:
    with pytest.raises(PlaintextRefusedError, match=r"is not encrypted .* refuses plaintext"):
        codec().decode(b'{"amount": 42}', PAYLOAD)
    with pytest.raises(PlaintextRefusedError):
        codec().decode(b"", PAYLOAD)
    assert codec(allow_plaintext=True).decode(b'{"amount": 42}', PAYLOAD) == b'{"amount": 42}'
    # Encrypted values are still decrypted by a codec that allows plaintext.
    sealed = codec().encode(SECRET, PAYLOAD)
    assert codec(allow_plaintext=True).decode(sealed, PAYLOAD) == SECRET


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (MAGIC + b"\x01", "truncated"),
        (MAGIC + b"\x02\x00\x02k1" + bytes(28), "version 2 is not supported"),
        (MAGIC + b"\x01\x80\x02k1" + bytes(28), "flags 0x80"),
        (MAGIC + b"\x01\x00\x00" + bytes(30), "key id length"),
        (MAGIC + b"\x01\x00\x02k!" + bytes(28), r"\[A-Za-z0-9_.-\]"),
    ],
)
def test_malformed_envelopes_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(MalformedEnvelopeError, match=match):
        codec().decode(data, PAYLOAD)


def test_keyring_text_env_and_file(tmp_path: Path) -> None:
    k1, k2 = base64.b64encode(K1).decode(), base64.b64encode(K2).decode()
    ring = Keyring.parse(f"# keys\nk1={k1}\n\n k2 = {k2} \n")
    assert (ring.key_ids, ring.active, ring.key("k2")) == (["k1", "k2"], "k2", K2)

    ring = Keyring.from_env(
        {"TASKBROKER_ENCRYPTION_KEYS": f"k1={k1},k2={k2}", "TASKBROKER_ENCRYPTION_ACTIVE_KEY": "k1"}
    )
    assert ring.active == "k1"

    path = tmp_path / "keys"
    path.write_text(Keyring.generate_entry("k3") + "\n")
    ring = Keyring.from_env({"TASKBROKER_ENCRYPTION_KEYS_FILE": str(path)})
    assert ring.key_ids == ["k3"] and len(ring.key("k3") or b"") == 32
    assert "k3=" not in repr(ring) and base64.b64encode(ring.key("k3") or b"").decode() not in (
        repr(AesGcmCodec(ring))
    )


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "at least one key"),
        ("k1=AAAA", "must be 32 bytes, not 3"),
        ("k1=not base64!", "'k1' is not valid base64"),
        ("bad id=AAAA", "key id 'bad id'"),
        ("k1", "has no '=<base64 key>'"),
    ],
)
def test_malformed_keyrings_are_refused_without_echoing_keys(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Keyring.parse(text)


def test_the_active_key_must_be_in_the_ring() -> None:
    with pytest.raises(ValueError, match="active key 'k9' is not in the ring"):
        Keyring({"k1": K1}, active="k9")
    with pytest.raises(ValueError, match="TASKBROKER_ENCRYPTION_KEYS"):
        Keyring.from_env({})


def test_aes_gcm_codec_is_a_payload_codec() -> None:
    assert isinstance(codec(), PayloadCodec)
