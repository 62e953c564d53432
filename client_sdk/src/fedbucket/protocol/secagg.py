"""Secure aggregation primitives both sides share (Bonawitz et al. 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning"; Bell et al. 2020, SecAgg+).

Everything cryptographic comes from ``cryptography`` (X25519, HKDF-SHA256, ChaCha20-Poly1305,
AES-256-CTR); only Shamir secret sharing is written here, over the prime field GF(2^521 - 1) with
Python integers, because the secrets are whole 32-byte seeds and keys (no folding, no splitting
into halves) and the field arithmetic is a dozen lines that the tests check exhaustively.

Invariants:

- Masks live in the ring of uint32 modulo 2^32; element ``i`` of a mask is word ``i`` of an
  AES-256-CTR keystream keyed by HKDF of a 32-byte seed, so any slice can be expanded alone (a
  Spark executor regenerates only its shard) and equals the same slice of a longer expansion.
- Pairwise mask seeds come from X25519 agreement and are never sent; what travels is encrypted
  under a key only the two parties can derive, with associated data binding round, sender and
  receiver, so a share replayed into another round or to another receiver fails authentication.
- Secret randomness comes from the OS (``secrets``, X25519 key generation), never a seeded PRNG.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedbucket.protocol.documents import FLOAT_DTYPES, RoundTask, SecAggMember, SecAggSetup, TensorSchema, TensorSpec
from fedbucket.protocol.errors import UpdateRejected

#: The ring masked inputs live in: uint32, arithmetic modulo 2^32.
RING_BITS = 32
SEED_BYTES = 32
#: The Mersenne prime 2^521 - 1: larger than any 32-byte secret, so a secret is one field element.
PRIME = (1 << 521) - 1
_SHARE_BYTES = 66  # ceil(521 / 8)


class InvalidShare(UpdateRejected):
    """A secure-aggregation message failed authentication (forged, replayed, or for another
    round, sender or receiver) or does not decode."""

    code = "invalid_share"


# -- Shamir secret sharing over GF(2^521 - 1) -------------------------------------------------


def split_secret(secret: bytes, threshold: int, holders: Sequence[int]) -> dict[int, bytes]:
    """Shares of ``secret`` (at most 65 bytes) for the holders at x-coordinates ``holders`` (distinct,
    1 <= x < PRIME): any ``threshold`` of them reconstruct it, fewer reveal nothing."""
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold must be between 1 and the {len(holders)} holders, got {threshold}")
    if len(set(holders)) != len(holders) or any(not 0 < x < PRIME for x in holders):
        raise ValueError("holders must be distinct x-coordinates in [1, PRIME)")
    value = int.from_bytes(secret, "big")
    if value >= PRIME:
        raise ValueError("secret too long for the field")
    coefficients = [value] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in holders:
        y = 0
        for c in reversed(coefficients):  # Horner: sum c_k x^k mod p
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(_SHARE_BYTES, "big")
    return shares


def _interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    """The value at ``at`` of the polynomial through ``points`` (Lagrange, mod PRIME)."""
    value = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (at - xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        value = (value + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return value


def combine_shares(shares: Mapping[int, bytes], threshold: int, length: int = SEED_BYTES) -> bytes:
    """The secret (``length`` bytes) from at least ``threshold`` shares: Lagrange interpolation at 0.

    Every share beyond the first ``threshold`` must lie on the same polynomial: a corrupted share
    raises ``ValueError`` instead of yielding a silently wrong secret (with exactly ``threshold``
    shares a corruption cannot be seen; the caller decides what to trust)."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} share(s); reconstruction needs {threshold}")
    points = [(x, int.from_bytes(y, "big")) for x, y in sorted(shares.items())]
    basis, extra = points[:threshold], points[threshold:]
    if any(_interpolate(basis, x) != y for x, y in extra):
        raise ValueError("the shares are inconsistent: at least one is corrupted")
    secret = _interpolate(basis, 0)
    if secret >> (8 * length):
        raise ValueError(f"the shares do not interpolate to a {length}-byte secret: they are inconsistent")
    return secret.to_bytes(length, "big")


# -- keys, agreement, authenticated encryption -------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair; ``public`` is the 32 raw bytes that travel."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        key = X25519PrivateKey.generate()
        raw = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return cls(raw, public_bytes(raw))

    def __repr__(self) -> str:  # never log a private key
        return f"KeyPair(public={self.public.hex()[:16]}…)"


def public_bytes(private: bytes) -> bytes:
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, purpose: str, context: bytes) -> bytes:
    """A 32-byte key both parties derive alone: HKDF-SHA256 of the X25519 shared secret, bound to
    ``purpose`` (encryption or masking) and ``context`` (the round and the sorted pair)."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # a malformed or small-order point: no shared secret
        raise InvalidShare("a public key is not a usable X25519 key (malformed or of small order)") from None
    info = b"fedbucket/secagg/v1/" + purpose.encode() + b"/" + context
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def usable_public_key(raw: bytes) -> bool:
    """Whether ``raw`` is an X25519 public key an exchange can use (32 bytes, not of small order)."""
    if len(raw) != 32:
        return False
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return False
    return True


def message_context(round_id: str, sender: str, receiver: str) -> bytes:
    """The associated data of one encrypted message: round, sender and receiver, length-prefixed."""
    return b"".join(len(p).to_bytes(2, "big") + p for p in (round_id.encode(), sender.encode(), receiver.encode()))


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """ChaCha20-Poly1305 with a random 96-bit nonce (prepended)."""
    nonce = secrets.token_bytes(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """The plaintext of :func:`seal`'s output; :class:`InvalidShare` if it was altered, replayed
    under other associated data, or sealed with another key."""
    if len(sealed) < 12 + 16:
        raise InvalidShare("sealed message too short")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:12], sealed[12:], associated)
    except InvalidTag:
        raise InvalidShare("authentication failed: forged, replayed, or addressed to another round or client") from None


# -- masks and quantisation --------------------------------------------------------------------


def mask_words(seed: bytes, start: int, stop: int) -> np.ndarray:
    """Words ``start`` to ``stop - 1`` (uint32) of the mask expanded from ``seed``: AES-256-CTR with
    an HKDF-derived key, counter block ``i`` holding words ``4i`` to ``4i + 3``."""
    if len(seed) != SEED_BYTES:
        raise ValueError("mask seeds are 32 bytes")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedbucket/secagg/v1/mask").derive(seed)
    first, last = start // 4, (stop + 3) // 4
    encryptor = Cipher(algorithms.AES(key), modes.CTR(first.to_bytes(16, "big"))).encryptor()
    words = np.frombuffer(encryptor.update(bytes(16 * (last - first))), dtype="<u4")
    return words[start - 4 * first : stop - 4 * first]


@dataclass(frozen=True)
class Quantiser:
    """Maps a clipped float vector into the ring and a sum of such vectors back.

    Each coordinate of a vector of L2 norm at most ``clip`` lies in [-clip, clip] and becomes
    ``round((x + clip) / (2 clip) * levels)`` in [0, levels]. ``levels`` is chosen so that the sum
    of the most clients a round admits (plus, with distributed DP, their noise) never wraps
    modulo 2^32 (:func:`ring_levels`).
    """

    clip: float
    levels: int

    @classmethod
    def for_clients(cls, clip: float, clients: int) -> Quantiser:
        """Without noise: ``levels = floor((2^32 - 1) / clients)``."""
        return cls(clip, ring_levels(clients))

    @property
    def scale(self) -> float:
        """Ring units per unit of the update."""
        return self.levels / (2 * self.clip)

    def quantise(self, values: np.ndarray) -> np.ndarray:
        if not np.isfinite(values).all():
            raise ValueError("a secure-aggregation input must be finite")
        scaled = (np.clip(values, -self.clip, self.clip) + self.clip) * self.scale
        return np.rint(scaled).astype(np.uint32)

    def decode_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The signed integer sum (int64) of ``count`` quantised-and-noised vectors whose ring sum
        is ``total``: without noise it lies in [0, count * levels]; noise can push it a little
        below 0 (it wrapped to the top of the ring) or above, never across the unused middle of the
        gap (:func:`ring_levels` leaves that headroom)."""
        value = total.astype(np.int64)
        top = count * self.levels
        wrapped = value > top + ((1 << RING_BITS) - top) // 2
        value[wrapped] -= 1 << RING_BITS
        return value

    def dequantise_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The float sum of ``count`` quantised vectors whose ring sum is ``total``."""
        return self.decode_sum(total, count).astype(np.float64) / self.scale - count * self.clip


def ring_levels(clients: int, *, headroom_per_level: float = 0.0, headroom: float = 0.0) -> int:
    """Quantisation levels so that ``clients`` values in [0, levels], plus noise of at most
    ``headroom_per_level * levels + headroom`` on each side of the sum, fit in 2^32 without wrapping."""
    levels = int(((1 << RING_BITS) - 1 - 2 * headroom) // (clients + 2 * headroom_per_level))
    if levels < 2:
        raise ValueError("the ring is too small for this many clients and this much noise")
    return levels


# -- the masked input as an update payload -----------------------------------------------------
# A masked input is a safetensors file with one U32 tensor per float tensor of the model (same
# name, same shape); integer buffers are not aggregated under secure aggregation (they stay the
# base model's). Mask words are addressed by a global element index: the float tensors in name
# order, concatenated, so client and server agree without sharing any file layout.

MASKED_DTYPE = "U32"


def masked_schema(schema: TensorSchema) -> TensorSchema:
    """The schema of a masked input for a model of ``schema``."""
    return {
        n: TensorSpec(dtype=MASKED_DTYPE, shape=s.shape) for n, s in sorted(schema.items()) if s.dtype in FLOAT_DTYPES
    }


def update_schema(task: RoundTask) -> TensorSchema:
    """What an update payload for ``task`` must look like: the model's schema (deltas), or the
    masked schema when the round uses secure aggregation."""
    return masked_schema(task.tensors) if task.secure_aggregation is not None else task.tensors


def element_offsets(schema: TensorSchema) -> dict[str, int]:
    """Each masked tensor's first global element index (float tensors in name order)."""
    offsets, at = {}, 0
    for name, spec in masked_schema(schema).items():
        offsets[name] = at
        at += spec.numel
    return offsets


def quantise_update(
    delta: Mapping[str, np.ndarray], schema: TensorSchema, quantiser: Quantiser
) -> dict[str, np.ndarray]:
    """The float tensors of ``delta`` clipped together to the quantiser's L2 norm, then mapped into
    the ring (uint32, each tensor's shape): the plaintext a client masks."""
    names = list(masked_schema(schema))
    values = {n: np.asarray(delta[n], dtype=np.float64) for n in names}
    norm = float(np.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in values.values())))
    if not np.isfinite(norm):
        raise ValueError("a secure-aggregation input must be finite")
    scale = 1.0 if norm <= quantiser.clip else quantiser.clip / norm
    return {n: quantiser.quantise(v * scale).reshape(v.shape) for n, v in values.items()}


# -- the protocol's shared data -------------------------------------------------------------


@dataclass(frozen=True)
class Advertised:
    """Phase 1 output: the two public keys and a digest of the self-mask seed (the server checks a
    rebuilt seed against it: a corrupted share abandons the round instead of skewing the sum)."""

    cipher_public: bytes
    mask_public: bytes
    seed_digest: bytes


def seed_digest(seed: bytes) -> bytes:
    """SHA-256 of a self-mask seed, domain-separated (the seed is 256 random bits: nothing leaks)."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"fedbucket/secagg/v1/seed-digest/" + seed)
    return digest.finalize()


@dataclass(frozen=True)
class Setup:
    """What the server publishes after phase 1: who advertised (with their keys and x-coordinates),
    each client's neighbours and the reconstruction threshold."""

    round_id: str
    keys: Mapping[str, Advertised]
    x: Mapping[str, int]
    neighbours: Mapping[str, tuple[str, ...]]
    threshold: int


#: Fewer inputs than this are never unmasked: the sum of two reveals each to the other's owner.
MIN_SURVIVORS = 3


def minimum_threshold(degree: int) -> int:
    """The smallest safe threshold for neighbourhoods of ``degree`` clients. A client's self-mask
    seed has ``degree + 1`` share holders (its neighbours and itself), its mask key ``degree``; a
    server that told some holders the client survived and others that it dropped could rebuild both
    secrets if ``2 t <= degree + 1``. So ``t = floor((degree + 1) / 2) + 1``."""
    return (degree + 1) // 2 + 1


def pair_context(round_id: str, a: str, b: str) -> bytes:
    low, high = sorted((a, b))
    return message_context(round_id, low, high)


def pairwise_sign(me: str, other: str) -> int:
    """+1 if ``me`` sorts before ``other``: the pair's masks cancel in the sum."""
    return 1 if me < other else -1


def masked_sum_inplace(out: np.ndarray, words: np.ndarray, sign: int) -> None:
    """``out += sign * words`` modulo 2^32 (uint32 arithmetic wraps)."""
    if sign > 0:
        np.add(out, words, out=out)
    else:
        np.subtract(out, words, out=out)


# -- documents <-> protocol data ---------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise InvalidShare(f"{what} is not base64") from None


def setup_from_document(doc: SecAggSetup) -> Setup:
    """The :class:`Setup` a published ``secagg-setup.json`` describes (keys decoded and checked)."""
    keys, x = {}, {}
    for client, member in doc.members.items():
        cipher, mask = unb64(member.cipher_public, "a public key"), unb64(member.mask_public, "a public key")
        digest = unb64(member.seed_digest, "a seed digest")
        if not (usable_public_key(cipher) and usable_public_key(mask)) or len(digest) != 32:
            raise InvalidShare(f"{client}: the setup carries an unusable public key or a malformed seed digest")
        keys[client], x[client] = Advertised(cipher, mask, digest), member.x
    unknown = {v for vs in doc.neighbours.values() for v in vs} | set(doc.neighbours)
    if not unknown <= set(keys) or len(set(x.values())) != len(x):
        raise InvalidShare("the setup names clients without keys, or repeats an x-coordinate")
    return Setup(
        round_id=doc.round_id,
        keys=keys,
        x=x,
        neighbours={c: tuple(vs) for c, vs in doc.neighbours.items()},
        threshold=doc.threshold,
    )


def setup_document(setup: Setup, *, clip_norm: float, max_clients: int) -> SecAggSetup:
    return SecAggSetup(
        round_id=setup.round_id,
        threshold=setup.threshold,
        clip_norm=clip_norm,
        max_clients=max_clients,
        members={
            c: SecAggMember(
                x=setup.x[c],
                cipher_public=b64(k.cipher_public),
                mask_public=b64(k.mask_public),
                seed_digest=b64(k.seed_digest),
            )
            for c, k in setup.keys.items()
        },
        neighbours={c: list(vs) for c, vs in setup.neighbours.items()},
    )
