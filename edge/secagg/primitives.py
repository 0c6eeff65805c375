"""The cryptographic primitives of secure aggregation, each a thin call into a well-kept library.

- X25519 key agreement and HKDF-SHA256 (`cryptography`), with a context that names the federation,
  run, round, attempt, both parties and the purpose, so no key is ever used for two things;
- ChaCha20-Poly1305 for the secret shares relayed through the aggregator, Poly1305 for the masked input;
- ChaCha20 keystreams of a full 32-byte key for the masks;
- Shamir t-of-k sharing over GF(2^128) (`pycryptodome`): it shares 16-byte secrets, so a 32-byte
  secret is split into two halves, each shared with the same indices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.poly1305 import Poly1305

from ..errors import FloraError

KEY_BYTES = 32
NONCE_BYTES = 12
SECRET_BYTES = 32  # the self-mask seed and an X25519 private key
HALF = 16  # what pycryptodome's Shamir shares at once
DOMAIN = b"flora-secagg-v1"
_ZERO_NONCE = bytes(16)  # ChaCha20's 16-byte counter||nonce: every mask key is used for one stream only


class CryptoError(FloraError, ValueError):
    """A ciphertext, tag or key that does not check out."""


@dataclass(frozen=True)
class Context:
    """What every derived key is bound to: one attempt of one round of one federation run."""

    federation: str
    run_id: str
    round: int
    attempt: int

    def info(self, src: str, dst: str, purpose: str) -> bytes:
        """HKDF info / AEAD associated data: the context, both parties and the purpose, NUL-separated (no
        field may hold a NUL: ids and purposes are restricted names, run ids hex)."""
        fields = (self.federation, self.run_id, str(self.round), str(self.attempt), src, dst, purpose)
        if any("\0" in f for f in fields):
            raise ValueError("a context field holds a NUL")
        return DOMAIN + b"\0" + "\0".join(fields).encode()


def hkdf(secret: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def new_x25519() -> Tuple[X25519PrivateKey, bytes]:
    key = X25519PrivateKey.generate()
    return key, key.public_key().public_bytes_raw()


def x25519_public(raw: bytes) -> X25519PublicKey:
    if len(raw) != KEY_BYTES:
        raise CryptoError(f"an X25519 public key has {KEY_BYTES} bytes, got {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def x25519_private(raw: bytes) -> X25519PrivateKey:
    if len(raw) != KEY_BYTES:
        raise CryptoError(f"an X25519 private key has {KEY_BYTES} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey, public_raw: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 of the X25519 shared secret under `info`; CryptoError for a low-order public key."""
    try:
        shared = private.exchange(x25519_public(public_raw))
    except ValueError as exc:  # cryptography refuses an all-zero shared secret (a low-order point)
        raise CryptoError(f"X25519 agreement failed: {exc}") from exc
    return hkdf(shared, info)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> Tuple[bytes, bytes]:
    """(nonce, ciphertext) with ChaCha20-Poly1305 under a fresh random nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce, ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    if len(nonce) != NONCE_BYTES:
        raise CryptoError(f"a nonce has {NONCE_BYTES} bytes, got {len(nonce)}")
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise CryptoError("the ciphertext does not authenticate") from None


def mac(key: bytes, data) -> bytes:
    """Poly1305 tag (a one-time key: each is derived for one message)."""
    return Poly1305.generate_tag(key, data)


def check_mac(key: bytes, data, tag: bytes) -> None:
    try:
        Poly1305.verify_tag(key, data, tag)
    except InvalidSignature:
        raise CryptoError("the Poly1305 tag does not verify") from None


def mask(key: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """`length` uniform words of `dtype` (uint32/uint64, little-endian) from ChaCha20 keyed with all 32 bytes."""
    if len(key) != KEY_BYTES:
        raise CryptoError(f"a mask key has {KEY_BYTES} bytes, got {len(key)}")
    dtype = np.dtype(dtype).newbyteorder("<")
    out = np.empty(length * dtype.itemsize, np.uint8)
    encryptor = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()
    encryptor.update_into(np.zeros(len(out), np.uint8), out)
    return out.view(dtype)


def split_secret(secret: bytes, threshold: int, holders: int) -> List[Tuple[int, bytes]]:
    """Shamir t-of-n shares (indices 1..n) of a 32-byte secret: each share is 32 bytes, both halves'."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"shared secrets have {SECRET_BYTES} bytes, got {len(secret)}")
    low = Shamir.split(threshold, holders, secret[:HALF])
    high = Shamir.split(threshold, holders, secret[HALF:])
    return [(i, a + b) for (i, a), (j, b) in zip(low, high) if i == j]


def combine_secret(shares: Sequence[Tuple[int, bytes]]) -> bytes:
    """The 32-byte secret from exactly `threshold` shares (index, 32 bytes)."""
    if any(len(s) != SECRET_BYTES for _, s in shares):
        raise CryptoError(f"a share has {SECRET_BYTES} bytes")
    try:
        low = Shamir.combine([(i, s[:HALF]) for i, s in shares])
        high = Shamir.combine([(i, s[HALF:]) for i, s in shares])
    except ValueError as exc:  # duplicate indices
        raise CryptoError(f"the shares do not combine: {exc}") from exc
    return low + high
