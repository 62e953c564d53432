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
   seed if it sent a masked input, else the share of its mask private key. Never both for one
   neighbour: a request that would reveal both is refused.

How the steps travel through the bucket is the protocol's business; this class only keeps the
client's secrets between phases and checks what the server asks of it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedbucket.protocol.documents import (
    SecAggInbox,
    SecAggKeys,
    SecAggRoster,
    SecAggSetup,
    SecAggShares,
    SecAggUnmask,
    read_document,
    write_document,
)
from fedbucket.protocol.errors import ConfigError
from fedbucket.protocol.layout import LAYOUT, BucketLayout
from fedbucket.protocol.secagg import (
    SEED_BYTES,
    Advertised,
    InvalidShare,
    KeyPair,
    Setup,
    agree,
    b64,
    mask_words,
    masked_sum_inplace,
    message_context,
    open_sealed,
    pair_context,
    pairwise_sign,
    seal,
    setup_from_document,
    split_secret,
    unb64,
)
from fedbucket.protocol.storage import ObjectStore

_SHARE = 66  # bytes of one field element


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
    _received: dict[str, bytes] = field(default_factory=dict)
    _revealed: dict[str, tuple[str, bytes]] | None = None
    _revealed_for: set[str] = field(default_factory=set)

    def __repr__(self) -> str:
        return f"SecAggClient({self.client_id!r}, round {self.round_id!r})"

    def advertise(self) -> Advertised:
        return Advertised(self.cipher.public, self.mask.public)

    def share_keys(self, setup: Setup) -> dict[str, bytes]:
        """Phase 2: ``{neighbour: sealed(b share || mask-key share)}``."""
        if setup.round_id != self.round_id or self.client_id not in setup.neighbours:
            raise ConfigError(f"{self.client_id}: the setup is for another round or does not include this client")
        mine = setup.keys.get(self.client_id)
        if mine != self.advertise():
            raise ConfigError(f"{self.client_id}: the setup carries keys this client did not advertise")
        neighbours = setup.neighbours[self.client_id]
        if len(neighbours) < setup.threshold:
            raise ConfigError(f"{self.client_id}: {len(neighbours)} neighbour(s), fewer than the threshold")
        self.setup = setup
        holders = [setup.x[v] for v in neighbours]
        seed_shares = split_secret(self.self_seed, setup.threshold, holders)
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

    def receive(self, sealed: Mapping[str, bytes]) -> None:
        """Phase 2 delivery: the neighbours' sealed shares addressed to this client (checked now:
        a forged or replayed one raises :class:`InvalidShare`)."""
        setup = self._setup()
        for sender, message in sealed.items():
            if sender not in setup.neighbours[self.client_id]:
                raise InvalidShare(f"a share from {sender!r}, who is not a neighbour of {self.client_id!r}")
            self._open(sender, message)
            self._received[sender] = message

    def masked_input(self, values: np.ndarray, shared: Sequence[str]) -> np.ndarray:
        """Phase 3: ``values`` (uint32, quantised) + PRG(b) + sum of ± PRG(s_uv) over the neighbours
        in ``shared`` (those whose shares the server delivered), modulo 2^32."""
        setup = self._setup()
        neighbours = set(setup.neighbours[self.client_id])
        shared_neighbours = sorted(neighbours & set(shared))
        if set(shared_neighbours) != set(self._received):
            raise ConfigError(
                f"{self.client_id}: the server says {sorted(shared_neighbours)} shared keys, but this client "
                f"received shares from {sorted(self._received)}"
            )
        if len(shared_neighbours) < setup.threshold:
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

    def unmask(self, survivors: Sequence[str]) -> dict[str, tuple[str, bytes]]:
        """Phase 4: for each neighbour that shared keys, ``("seed", share)`` if it is among the
        ``survivors`` (sent a masked input), else ``("key", share)``. Answered once: a second request
        with other survivors is refused (it would reveal both secrets of some neighbour)."""
        setup = self._setup()
        alive = set(survivors)
        if self._revealed is not None:
            if self._revealed_for != alive:
                raise ConfigError(f"{self.client_id}: unmasking was already answered for other survivors; refusing")
            return dict(self._revealed)
        if len(alive & set(self.shared_with)) + (self.client_id in alive) < setup.threshold:
            raise ConfigError(f"{self.client_id}: fewer survivors than the threshold; refusing to unmask")
        out = {}
        for v in self.shared_with:
            plain = self._open(v, self._received[v])
            seed_share, key_share = plain[:_SHARE], plain[_SHARE:]
            out[v] = ("seed", seed_share) if v in alive else ("key", key_share)
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


def receive_inbox(store: ObjectStore, session: SecAggClient, *, layout: BucketLayout = LAYOUT) -> None:
    """Phase 2 delivery: the shares the server copied into this client's inbox (each authenticated)."""
    doc, _ = read_document(store, layout.secagg_client(session.client_id, session.round_id, "inbox"), SecAggInbox)
    if doc.client_id != session.client_id or doc.round_id != session.round_id:
        raise InvalidShare("the inbox is addressed to another client or round")
    session.receive({sender: unb64(text, f"a share from {sender}") for sender, text in doc.sealed.items()})


def read_roster(store: ObjectStore, round_id: str, phase: str, *, layout: BucketLayout = LAYOUT) -> list[str]:
    doc, _ = read_document(store, layout.secagg_roster(round_id, phase), SecAggRoster)
    if doc.round_id != round_id or doc.phase != phase:
        raise InvalidShare(f"the {phase} roster is for another round or phase")
    return list(doc.clients)


def post_unmask(
    store: ObjectStore, session: SecAggClient, survivors: Sequence[str], *, layout: BucketLayout = LAYOUT
) -> None:
    """Phase 4: the shares the survivors entitle the server to (never both of one neighbour's)."""
    answers = session.unmask(survivors)
    doc = SecAggUnmask(
        client_id=session.client_id,
        round_id=session.round_id,
        seeds={v: b64(share) for v, (kind, share) in answers.items() if kind == "seed"},
        keys={v: b64(share) for v, (kind, share) in answers.items() if kind == "key"},
    )
    write_document(store, layout.secagg_client(session.client_id, session.round_id, "unmask"), doc)
