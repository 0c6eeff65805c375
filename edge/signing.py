"""Signed messages: Ed25519 over the exact payload, carried in the payload itself (transport-agnostic).

A signed payload is `MAGIC || signature (64 bytes) || body`. The signature covers a domain string,
the message's purpose (`global`, `round`, a secure-aggregation stage) and the federation, then the
body, so a signature made for one topic or federation verifies for no other. The body is what the
unsigned protocol sends (a safetensors blob, a JSON object), so one envelope serves every message,
survives retained messages and MQTT bridges unchanged (no MQTT 5 user property to lose), and is
checked before the body is parsed. docs/protocol.md ("Signed messages") says why.
"""

from __future__ import annotations

import base64
import binascii
from typing import Tuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import FloraError

MAGIC = b"FLORA-SIG1"
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
_DOMAIN = b"flora-signed-v1"

#: Refusal reasons (the agent logs them and publishes them in its error status).
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad-signature"


class SignatureError(FloraError, ValueError):
    """A message that does not verify; `reason` is one of the refusal reasons above."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _signed_bytes(purpose: str, federation: str, body: bytes) -> bytes:
    return b"\0".join((_DOMAIN, purpose.encode(), federation.encode(), body))


def sign(key: Ed25519PrivateKey, purpose: str, federation: str, body: bytes) -> bytes:
    return MAGIC + key.sign(_signed_bytes(purpose, federation, body)) + body


def is_signed(payload: bytes) -> bool:
    return payload[: len(MAGIC)] == MAGIC and len(payload) >= len(MAGIC) + SIGNATURE_BYTES


def split(payload: bytes) -> Tuple[bytes, bytes]:
    """(signature, body); SignatureError `unsigned` if there is no envelope."""
    if not is_signed(payload):
        raise SignatureError(UNSIGNED, "the message carries no signature")
    start = len(MAGIC)
    return bytes(payload[start: start + SIGNATURE_BYTES]), bytes(payload[start + SIGNATURE_BYTES:])


def body_of(payload: bytes) -> bytes:
    """The body of a signed payload without verifying it (to read who claims to have signed it)."""
    return split(payload)[1]


def verify(public: Ed25519PublicKey, purpose: str, federation: str, payload: bytes) -> bytes:
    """The body of `payload` if it carries `public`'s signature for this purpose and federation."""
    signature, body = split(payload)
    try:
        public.verify(signature, _signed_bytes(purpose, federation, body))
    except InvalidSignature:
        raise SignatureError(BAD_SIGNATURE, f"the {purpose} message's signature does not verify") from None
    return body


def public_key_b64(key: Ed25519PublicKey) -> str:
    return base64.b64encode(key.public_bytes_raw()).decode()


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from its 32 raw bytes in base64 (as configs and enrollment give it)."""
    try:
        raw = base64.b64decode(str(text).strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not a base64 Ed25519 public key: {exc}") from exc
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)
