"""One client's side of secure aggregation (SecAgg / SecAgg+), as pure steps on data.

The four client phases of Bonawitz et al. 2017 (Bell et al. 2020 restrict each client's sharing
to its neighbours in a server-published graph):

1. :meth:`SecAggClient.advertise` — two fresh X25519 public keys: ``cipher`` (to encrypt shares)
   and ``mask`` (to agree pairwise mask seeds);
2. :meth:`SecAggClient.share_keys` — Shamir shares of the self-mask seed ``b`` and of the mask
   private key, one of each per neighbour, each encrypted for that neighbour (AEAD, associated
   data = round, sender, receiver);
3. :meth:`SecAggClient.masked_input` — the quantised update plus the self mask plus, for every
   neighbour that shared keys, ± the pairwise mask, modulo 2^32;
4. :meth:`SecAggClient.unmask` — for every neighbour that shared keys: the share of its self-mask
   seed if it sent a masked input, else the share of its mask private key; and, being alive, its
   own share of its own self-mask seed. Never both for one
   neighbour: a request that would reveal both is refused.

How the steps travel through the bucket is the protocol's business; this class only keeps the
client's secrets between phases and checks what the server asks of it.
"""

from __future__ import annotations

import math
import secrets
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedbucket.protocol.documents import (
    DocumentT,
    RoundTask,
    SecAggInbox,
    SecAggKeys,
    SecAggRoster,
    SecAggSetup,
    SecAggShares,
    SecAggUnmask,
    SecureAggregationTask,
    UpdateManifest,
    read_document,
    read_optional,
    utcnow,
    write_document,
)
from fedbucket.protocol.errors import ConfigError, RoundNotOpen, WaitTimeout
from fedbucket.protocol.layout import LAYOUT, BucketLayout
from fedbucket.protocol.secagg import (
    MIN_SURVIVORS,
    SEED_BYTES,
    Advertised,
    InvalidShare,
    KeyPair,
    Quantiser,
    Setup,
    agree,
    b64,
    element_offsets,
    mask_words,
    masked_sum_inplace,
    message_context,
    minimum_threshold,
    open_sealed,
    pair_context,
    pairwise_sign,
    quantise_update,
    seal,
    seed_digest,
    setup_from_document,
    split_secret,
    unb64,
)
from fedbucket.protocol.storage import ObjectStore
from fedbucket.protocol.tensors import save_tensors

_SHARE = 66  # bytes of one field element
_NOISE_CHUNK = 1 << 20  # proposals per draw: bounds the sampler's memory (~100 MB) whatever the model


@dataclass
class SecAggClient:
    """A client's secrets and checks for one round."""

    client_id: str
    round_id: str
    cipher: KeyPair = field(default_factory=KeyPair.generate)
    mask: KeyPair = field(default_factory=KeyPair.generate)
    self_seed: bytes = field(default_factory=lambda: secrets.token_bytes(SEED_BYTES))
    setup: Setup | None = None
    shared_with: tuple[str, ...] = ()
    masked_with: tuple[str, ...] = ()
    rejected: dict[str, str] = field(default_factory=dict)
    _own_seed_share: bytes = b""
    _received: dict[str, bytes] = field(default_factory=dict)
    _revealed: dict[str, tuple[str, bytes]] | None = None
    _revealed_for: set[str] = field(default_factory=set)

    def __repr__(self) -> str:
        return f"SecAggClient({self.client_id!r}, round {self.round_id!r})"

    def advertise(self) -> Advertised:
        return Advertised(self.cipher.public, self.mask.public, seed_digest(self.self_seed))

    def share_keys(self, setup: Setup) -> dict[str, bytes]:
        """Phase 2: ``{neighbour: sealed(b share || mask-key share)}``."""
        if setup.round_id != self.round_id or self.client_id not in setup.neighbours:
            raise ConfigError(f"{self.client_id}: the setup is for another round or does not include this client")
        mine = setup.keys.get(self.client_id)
        if mine != self.advertise():
            raise ConfigError(f"{self.client_id}: the setup carries keys this client did not advertise")
        neighbours = setup.neighbours[self.client_id]
        if not minimum_threshold(len(neighbours)) <= setup.threshold <= len(neighbours):
            raise ConfigError(
                f"{self.client_id}: threshold {setup.threshold} with {len(neighbours)} neighbour(s) is unsafe or "
                f"impossible (it must be at least {minimum_threshold(len(neighbours))}); refusing to share"
            )
        self.setup = setup
        holders = [setup.x[v] for v in neighbours]
        # The client holds a share of its own self-mask seed too (Bonawitz et al. share among all of
        # U1, sender included): revealed only when it survived, when the seed is due anyway.
        seed_shares = split_secret(self.self_seed, setup.threshold, [*holders, setup.x[self.client_id]])
        self._own_seed_share = seed_shares[setup.x[self.client_id]]
        key_shares = split_secret(self.mask.private, setup.threshold, holders)
        out = {}
        for v in neighbours:
            key = agree(
                self.cipher.private,
                setup.keys[v].cipher_public,
                "encrypt",
                pair_context(self.round_id, self.client_id, v),
            )
            payload = seed_shares[setup.x[v]] + key_shares[setup.x[v]]
            out[v] = seal(key, payload, message_context(self.round_id, self.client_id, v))
        return out

    def receive(self, sealed: Mapping[str, bytes]) -> dict[str, str]:
        """Phase 2 delivery: the neighbours' sealed shares addressed to this client, each
        authenticated now. A forged or replayed one is set aside (returned, sender -> reason):
        this client then holds no share of that sender's secrets, but still masks with it."""
        setup = self._setup()
        rejected = {}
        for sender, message in sealed.items():
            if sender not in setup.neighbours[self.client_id]:
                rejected[sender] = f"a share from {sender!r}, who is not a neighbour of {self.client_id!r}"
                continue
            try:
                self._open(sender, message)
            except InvalidShare as exc:
                rejected[sender] = str(exc)
                continue
            self._received[sender] = message
        self.rejected.update(rejected)
        return rejected

    def masked_input(self, values: np.ndarray, shared: Sequence[str]) -> np.ndarray:
        """Phase 3: ``values`` (uint32, quantised) + PRG(b) + sum of ± PRG(s_uv) over the neighbours
        in ``shared`` (those whose shares the server delivered), modulo 2^32."""
        setup = self._setup()
        neighbours = set(setup.neighbours[self.client_id])
        shared_neighbours = sorted(neighbours & set(shared))
        delivered = set(self._received) | set(self.rejected)
        if not set(shared_neighbours) <= delivered:
            raise ConfigError(
                f"{self.client_id}: the server says {sorted(shared_neighbours)} shared keys, but this client "
                f"received shares from {sorted(delivered)}"
            )
        if len(shared_neighbours) + 1 < setup.threshold:  # its seed's holders: those neighbours and itself
            raise ConfigError(f"{self.client_id}: only {len(shared_neighbours)} neighbour(s) left, below the threshold")
        out = np.array(values, dtype=np.uint32, copy=True)
        masked_sum_inplace(out, mask_words(self.self_seed, 0, out.size), +1)
        for v in shared_neighbours:
            seed = self.pair_seed(v)
            masked_sum_inplace(out, mask_words(seed, 0, out.size), pairwise_sign(self.client_id, v))
        self.shared_with = tuple(shared_neighbours)
        return out

    def pair_seed(self, other: str) -> bytes:
        setup = self._setup()
        return agree(
            self.mask.private, setup.keys[other].mask_public, "mask", pair_context(self.round_id, self.client_id, other)
        )

    def unmask(self, survivors: Sequence[str], *, minimum_survivors: int = 0) -> dict[str, tuple[str, bytes]]:
        """Phase 4: for each neighbour that shared keys, ``("seed", share)`` if it is among the
        ``survivors`` (sent a masked input), else ``("key", share)``. Answered once: a second request
        with other survivors is refused (it would reveal both secrets of some neighbour). Fewer
        survivors than ``minimum_survivors`` (distributed DP: the noise was sized for that many) or
        than 3 are refused: their sum would reveal too much."""
        setup = self._setup()
        alive = set(survivors)
        if self._revealed is not None:
            if self._revealed_for != alive:
                raise ConfigError(f"{self.client_id}: unmasking was already answered for other survivors; refusing")
            return dict(self._revealed)
        if len(alive & set(self.shared_with)) + (self.client_id in alive) < setup.threshold or len(alive) < max(
            MIN_SURVIVORS, minimum_survivors
        ):
            raise ConfigError(
                f"{self.client_id}: {len(alive)} survivor(s), fewer than the threshold or the minimum of "
                f"{max(MIN_SURVIVORS, minimum_survivors)}; refusing to unmask"
            )
        out = {}
        for v in self.shared_with:
            if v not in self._received:
                continue  # its share to this client failed authentication: nothing to reveal
            plain = self._open(v, self._received[v])
            seed_share, key_share = plain[:_SHARE], plain[_SHARE:]
            out[v] = ("seed", seed_share) if v in alive else ("key", key_share)
        if self.client_id in alive:
            out[self.client_id] = ("seed", self._own_seed_share)
        self._revealed, self._revealed_for = out, alive
        return dict(out)

    def _open(self, sender: str, message: bytes) -> bytes:
        setup = self._setup()
        key = agree(
            self.cipher.private,
            setup.keys[sender].cipher_public,
            "encrypt",
            pair_context(self.round_id, sender, self.client_id),
        )
        plain = open_sealed(key, message, message_context(self.round_id, sender, self.client_id))
        if len(plain) != 2 * _SHARE:
            raise InvalidShare(f"a share from {sender!r} has the wrong length")
        return plain

    def _setup(self) -> Setup:
        if self.setup is None:
            raise ConfigError(f"{self.client_id}: no setup yet (phase 2 comes first)")
        return self.setup


# -- the client's phases over the bucket -------------------------------------------------------
# A client reads only the round's public secure-aggregation documents and its own prefix.


def post_keys(store: ObjectStore, session: SecAggClient, *, layout: BucketLayout = LAYOUT) -> None:
    """Phase 1: ``updates/<client>/<round>/secagg-keys.json``."""
    keys = session.advertise()
    doc = SecAggKeys(
        client_id=session.client_id,
        round_id=session.round_id,
        cipher_public=b64(keys.cipher_public),
        mask_public=b64(keys.mask_public),
        seed_digest=b64(keys.seed_digest),
    )
    write_document(store, layout.secagg_client(session.client_id, session.round_id, "keys"), doc)


def read_setup(store: ObjectStore, round_id: str, *, layout: BucketLayout = LAYOUT) -> tuple[Setup, SecAggSetup]:
    doc, _ = read_document(store, layout.secagg_setup(round_id), SecAggSetup)
    return setup_from_document(doc), doc


def post_shares(store: ObjectStore, session: SecAggClient, setup: Setup, *, layout: BucketLayout = LAYOUT) -> None:
    """Phase 2: the sealed shares for the neighbours the setup gives this client."""
    sealed = session.share_keys(setup)
    doc = SecAggShares(
        client_id=session.client_id, round_id=session.round_id, sealed={v: b64(m) for v, m in sealed.items()}
    )
    write_document(store, layout.secagg_client(session.client_id, session.round_id, "shares"), doc)


def receive_inbox(store: ObjectStore, session: SecAggClient, *, layout: BucketLayout = LAYOUT) -> dict[str, str]:
    """Phase 2 delivery: the shares the server copied into this client's inbox (each authenticated;
    the rejected ones are returned, sender -> reason)."""
    doc, _ = read_document(store, layout.secagg_client(session.client_id, session.round_id, "inbox"), SecAggInbox)
    if doc.client_id != session.client_id or doc.round_id != session.round_id:
        raise InvalidShare("the inbox is addressed to another client or round")
    decoded, rejected = {}, {}
    for sender, text in doc.sealed.items():
        try:
            decoded[sender] = unb64(text, f"a share from {sender}")
        except InvalidShare as exc:
            rejected[sender] = str(exc)
    session.rejected.update(rejected)
    return rejected | session.receive(decoded)


def read_roster(store: ObjectStore, round_id: str, phase: str, *, layout: BucketLayout = LAYOUT) -> list[str]:
    doc, _ = read_document(store, layout.secagg_roster(round_id, phase), SecAggRoster)
    if doc.round_id != round_id or doc.phase != phase:
        raise InvalidShare(f"the {phase} roster is for another round or phase")
    return list(doc.clients)


def post_unmask(
    store: ObjectStore,
    session: SecAggClient,
    survivors: Sequence[str],
    *,
    minimum_survivors: int = 0,
    layout: BucketLayout = LAYOUT,
) -> None:
    """Phase 4: the shares the survivors entitle the server to (never both of one neighbour's)."""
    answers = session.unmask(survivors, minimum_survivors=minimum_survivors)
    doc = SecAggUnmask(
        client_id=session.client_id,
        round_id=session.round_id,
        seeds={v: b64(share) for v, (kind, share) in answers.items() if kind == "seed"},
        keys={v: b64(share) for v, (kind, share) in answers.items() if kind == "key"},
    )
    write_document(store, layout.secagg_client(session.client_id, session.round_id, "unmask"), doc)


# -- distributed DP: the client's noise -----------------------------------------------------------


def discrete_gaussian(size: int, stddev: float) -> np.ndarray:
    """``size`` independent draws (int64) of the discrete Gaussian N_Z(0, stddev^2).

    Canonne, Kamath, Steinke 2020 ("The Discrete Gaussian for Differential Privacy", Algorithm 3):
    propose Y from the discrete Laplace of scale ``t = floor(stddev) + 1`` (the difference of two
    geometric draws), accept it with probability ``exp(-(|Y| - stddev^2 / t)^2 / (2 stddev^2))``.
    Vectorised in double precision (as TensorFlow Federated's sampler is), not with the paper's exact
    rational arithmetic; the uniforms are AES-256-CTR keystream under a fresh key from the OS's
    CSPRNG, never a seeded generator.
    """
    t = math.floor(stddev) + 1
    variance = stddev * stddev
    key = secrets.token_bytes(32)
    out = np.empty(size, dtype=np.int64)
    filled, block = 0, 0
    while filled < size:
        want = min(_NOISE_CHUNK, max(1024, 2 * (size - filled)))  # about half of the proposals are accepted
        words = Cipher(algorithms.AES(key), modes.CTR(block.to_bytes(16, "big"))).encryptor().update(bytes(24 * want))
        block += (24 * want + 15) // 16
        u = ((np.frombuffer(words, dtype="<u8") >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
        u1, u2, u3 = u[0::3], u[1::3], u[2::3]  # each in (0, 1)
        proposal = np.floor(-t * np.log(u1)) - np.floor(-t * np.log(u2))
        accept = u3 < np.exp(-((np.abs(proposal) - variance / t) ** 2) / (2 * variance))
        taken = proposal[accept][: size - filled]
        out[filled : filled + taken.size] = taken
        filled += taken.size
    return out


# -- one client's secure round, end to end ----------------------------------------------------


def _await_document(
    store: ObjectStore, name: str, cls: type[DocumentT], *, until: datetime, poll_seconds: float, what: str
) -> DocumentT:
    """Poll for ``name`` until it exists or ``until`` passes (then :class:`WaitTimeout`)."""
    while True:
        doc, _ = read_optional(store, name, cls)
        if doc is not None:
            return doc
        if utcnow() >= until:
            raise WaitTimeout(f"secure aggregation: {what} did not appear by {until.isoformat()}; out of this round")
        time.sleep(max(0.05, min(poll_seconds, (until - utcnow()).total_seconds())))


@dataclass
class SecureRound:
    """A client's secure-aggregation round over the bucket, one method per phase, in order:
    :meth:`advertise`, :meth:`share`, :meth:`send_masked`, :meth:`unmask` (:func:`submit_securely`
    runs them all). Each waits, up to the phase's deadline in the round task, for what the server
    publishes before it; a client that stops after any phase has *dropped*, and the protocol
    removes its masks without learning its input.

    ``upload`` commits the masked payload file as this client's update (the SDK's
    :func:`~fedbucket.client.sdk.upload_update`, so the server's own checks run first)."""

    store: ObjectStore
    task: RoundTask
    client_id: str
    upload: Callable[[Path], UpdateManifest]
    poll_seconds: float = 0.5
    layout: BucketLayout = LAYOUT
    log: Callable[[str], None] = lambda line: None
    session: SecAggClient = field(init=False)
    setup_doc: SecAggSetup | None = None

    def __post_init__(self) -> None:
        if self.task.secure_aggregation is None:
            raise ConfigError(f"round {self.task.round_id} does not use secure aggregation")
        self.session = SecAggClient(self.client_id, self.task.round_id)

    @property
    def settings(self) -> SecureAggregationTask:
        assert self.task.secure_aggregation is not None
        return self.task.secure_aggregation

    def advertise(self) -> None:
        """Phase 1: post the two public keys."""
        if utcnow() > self.settings.keys_deadline:
            raise RoundNotOpen(f"round {self.task.round_id}: phase 1 (keys) closed at {self.settings.keys_deadline}")
        post_keys(self.store, self.session, layout=self.layout)
        self.log("secure aggregation: keys posted")

    def share(self) -> None:
        """Phase 2: wait for the setup, post the sealed shares for this client's neighbours."""
        doc = _await_document(
            self.store,
            self.layout.secagg_setup(self.task.round_id),
            SecAggSetup,
            until=self.settings.shares_deadline,
            poll_seconds=self.poll_seconds,
            what="the setup",
        )
        setup = setup_from_document(doc)
        if self.client_id not in setup.neighbours:
            raise RoundNotOpen(
                f"round {self.task.round_id}: this client is not in the setup (phase 1 closed before its keys "
                "arrived, the round was full, or the federation's privacy participation cap was reached)"
            )
        self.setup_doc = doc
        post_shares(self.store, self.session, setup, layout=self.layout)
        self.log(f"secure aggregation: shares posted for {len(setup.neighbours[self.client_id])} neighbour(s)")

    def send_masked(self, delta: Mapping[str, np.ndarray], *, tmp_dir: Path) -> UpdateManifest:
        """Phase 3: wait for the ``shared`` roster, read the inbox, upload the masked input."""
        doc = _await_document(
            self.store,
            self.layout.secagg_roster(self.task.round_id, "shared"),
            SecAggRoster,
            until=self.task.deadline,
            poll_seconds=self.poll_seconds,
            what="the shared roster",
        )
        if self.client_id not in doc.clients:
            raise RoundNotOpen(f"round {self.task.round_id}: this client's shares were not delivered (phase 2 closed)")
        for sender, reason in receive_inbox(self.store, self.session, layout=self.layout).items():
            self.log(f"secure aggregation: the share from {sender} was rejected ({InvalidShare.code}): {reason}")
        quantiser = Quantiser(self.settings.clip_norm, self.settings.levels)
        plain = quantise_update(delta, self.task.tensors, quantiser)
        offsets = element_offsets(self.task.tensors)
        flat = np.concatenate([plain[n].ravel() for n in offsets]) if offsets else np.zeros(0, np.uint32)
        if self.settings.noise_stddev > 0:  # distributed DP: this client's share of the noise, in the ring
            noisy = flat.astype(np.int64) + discrete_gaussian(flat.size, self.settings.noise_stddev)
            flat = (noisy % (1 << 32)).astype(np.uint32)
        masked = self.session.masked_input(flat, doc.clients)
        tensors = {n: masked[at : at + plain[n].size].reshape(plain[n].shape) for n, at in offsets.items()}
        path = tmp_dir / f"{self.client_id}-{self.task.round_id}-masked.safetensors"
        save_tensors(tensors, path)
        manifest = self.upload(path)
        self.log(f"secure aggregation: masked input sent ({flat.size} elements, clipped to {quantiser.clip:g})")
        return manifest

    def unmask(self) -> None:
        """Phase 4: wait for the ``masked`` roster, post the shares it entitles the server to."""
        doc = _await_document(
            self.store,
            self.layout.secagg_roster(self.task.round_id, "masked"),
            SecAggRoster,
            until=self.settings.unmask_deadline,
            poll_seconds=self.poll_seconds,
            what="the masked roster",
        )
        if doc.round_id != self.task.round_id or doc.phase != "masked":
            raise InvalidShare("the masked roster is for another round or phase")
        if self.client_id not in doc.clients:
            raise RoundNotOpen(f"round {self.task.round_id}: this client's masked input is not in the sum")
        minimum = self.settings.min_survivors if self.settings.noise_stddev > 0 else 0
        post_unmask(self.store, self.session, doc.clients, minimum_survivors=minimum, layout=self.layout)
        self.log(f"secure aggregation: unmasking answered ({len(doc.clients)} survivor(s))")


def submit_securely(
    store: ObjectStore,
    task: RoundTask,
    client_id: str,
    delta: Mapping[str, np.ndarray],
    *,
    upload: Callable[[Path], UpdateManifest],
    poll_seconds: float = 0.5,
    layout: BucketLayout = LAYOUT,
    log: Callable[[str], None] = lambda line: None,
) -> UpdateManifest:
    """Every client phase of a secure round for one computed ``delta``; returns the committed
    manifest of the masked input once the unmasking is answered."""
    secure = SecureRound(store, task, client_id, upload, poll_seconds=poll_seconds, layout=layout, log=log)
    secure.advertise()
    secure.share()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = secure.send_masked(delta, tmp_dir=Path(tmp))
    secure.unmask()
    return manifest
