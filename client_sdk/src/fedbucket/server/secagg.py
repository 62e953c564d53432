"""The server's side of secure aggregation: the neighbour graph, and removing the masks.

The server never sees an individual update: it sums the masked inputs of the survivors modulo
2^32, reconstructs from the revealed Shamir shares the seeds it is entitled to — the self-mask
seed of every survivor, the mask private key of every client that shared keys but sent no masked
input — and subtracts the masks those seeds expand to. What is left is the exact ring sum of the
survivors' quantised updates. Removing masks is per element range (:func:`unmask_range`), so Spark
executors each regenerate only their shard's slice of every mask.

Below the threshold (too few survivors, or too few shares for a secret the server needs) the round
is abandoned with a reason (:class:`SecAggAbandoned`): nothing is released.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedbucket.protocol.documents import (
    DocumentT,
    SecAggInbox,
    SecAggKeys,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
    read_document,
    write_document,
)
from fedbucket.protocol.errors import FedbucketError, SchemaError, StorageError
from fedbucket.protocol.layout import LAYOUT, BucketLayout
from fedbucket.protocol.secagg import (
    SEED_BYTES,
    Advertised,
    InvalidShare,
    Setup,
    agree,
    combine_shares,
    mask_words,
    masked_sum_inplace,
    pair_context,
    pairwise_sign,
    setup_document,
    unb64,
)
from fedbucket.protocol.storage import ObjectStore
from fedbucket.protocol.validation import list_secagg_documents


class SecAggAbandoned(FedbucketError):
    """Secure aggregation cannot finish: below the threshold at some phase. The reason says where."""


def neighbour_graph(clients: Sequence[str], degree: int | None) -> dict[str, tuple[str, ...]]:
    """Each client's neighbours: everyone (``degree`` None or at least n - 1), else a random
    ``degree``-regular circulant graph (Harary) over a secret random ordering of the clients
    (SecAgg+, Bell et al. 2020: degree O(log n) keeps the per-client cost logarithmic)."""
    ordered = sorted(clients)
    n = len(ordered)
    if degree is None or degree >= n - 1:
        return {c: tuple(v for v in ordered if v != c) for c in ordered}
    if degree < 2 or degree % 2:
        raise ValueError("a sparse neighbour graph needs an even degree of at least 2")
    ring = list(ordered)
    for i in range(n - 1, 0, -1):  # Fisher-Yates with the OS's randomness
        j = secrets.randbelow(i + 1)
        ring[i], ring[j] = ring[j], ring[i]
    neighbours: dict[str, set[str]] = {c: set() for c in ring}
    for i, client in enumerate(ring):
        for step in range(1, degree // 2 + 1):
            other = ring[(i + step) % n]
            neighbours[client].add(other)
            neighbours[other].add(client)
    return {c: tuple(sorted(vs)) for c, vs in sorted(neighbours.items())}


def make_setup(
    round_id: str, advertised: Mapping[str, Advertised], *, degree: int | None = None, threshold: int | None = None
) -> Setup:
    """The setup the server publishes after phase 1. ``threshold`` defaults to a strict majority of
    each neighbourhood (``floor(k / 2) + 1``; fewer colluders than that learn nothing)."""
    clients = sorted(advertised)
    neighbours = neighbour_graph(clients, degree)
    smallest = min(len(v) for v in neighbours.values())
    threshold = threshold or smallest // 2 + 1
    if not max(2, smallest // 2 + 1) <= threshold <= smallest:
        raise SecAggAbandoned(
            f"threshold {threshold} is impossible with neighbourhoods of {smallest} client(s): it must be a strict "
            "majority (at most half could otherwise combine two conflicting views of who survived)"
        )
    return Setup(
        round_id=round_id,
        keys=dict(advertised),
        x={c: i + 1 for i, c in enumerate(clients)},
        neighbours=neighbours,
        threshold=threshold,
    )


@dataclass(frozen=True)
class UnmaskPlan:
    """The masks to subtract from the survivors' ring sum: ``(seed, sign)`` pairs, where the sum
    holds ``+sign * PRG(seed)``. Small and picklable; executors expand their own slices."""

    survivors: tuple[str, ...]
    corrections: tuple[tuple[bytes, int], ...]

    def __repr__(self) -> str:  # the seeds are secrets the server is entitled to, not log material
        return f"UnmaskPlan({len(self.survivors)} survivors, {len(self.corrections)} masks)"


def plan_unmasking(
    setup: Setup,
    shared: Sequence[str],
    survivors: Sequence[str],
    responses: Mapping[str, Mapping[str, tuple[str, bytes]]],
) -> UnmaskPlan:
    """Reconstruct what the server may know and list the masks to remove.

    ``shared``: clients whose phase-2 shares were delivered (U2); ``survivors``: clients whose
    masked input arrived (U3, a subset of U2); ``responses``: phase-4 answers by responder
    (``{neighbour: ("seed" | "key", share)}``). Raises :class:`SecAggAbandoned` below the threshold.
    """
    u2, u3 = set(shared), set(survivors)
    if not u3 <= u2:
        raise SecAggAbandoned("a masked input came from a client that never shared keys")
    if len(u3) < setup.threshold:
        raise SecAggAbandoned(f"{len(u3)} masked input(s), fewer than the threshold of {setup.threshold}")
    seed_shares: dict[str, dict[int, bytes]] = {}
    key_shares: dict[str, dict[int, bytes]] = {}
    for responder, answers in sorted(responses.items()):
        if responder not in u3:
            continue  # only survivors answer phase 4
        relevant = {a: ks for a, ks in answers.items() if responder in setup.neighbours.get(a, ())}
        if any(kind != ("seed" if about in u3 else "key") for about, (kind, _) in relevant.items()):
            continue  # a responder that answers against the roster is not used at all
        for about, (kind, share) in relevant.items():
            (seed_shares if kind == "seed" else key_shares).setdefault(about, {})[setup.x[responder]] = share
    corrections: list[tuple[bytes, int]] = []
    for u in sorted(u3):
        shares = seed_shares.get(u, {})
        if len(shares) < setup.threshold:
            raise SecAggAbandoned(
                f"{len(shares)} share(s) of {u}'s self mask, fewer than the threshold {setup.threshold}"
            )
        corrections.append((_combine(shares, setup.threshold, f"{u}'s self-mask seed"), +1))
    for v in sorted(u2 - u3):  # shared keys, then dropped: remove the pairwise masks survivors added for it
        shares = key_shares.get(v, {})
        if len(shares) < setup.threshold:
            raise SecAggAbandoned(f"{len(shares)} share(s) of dropped {v}'s mask key, fewer than the threshold")
        private = _combine(shares, setup.threshold, f"dropped {v}'s mask key")
        for u in setup.neighbours[v]:
            if u in u3:
                seed = agree(private, setup.keys[u].mask_public, "mask", pair_context(setup.round_id, u, v))
                corrections.append((seed, pairwise_sign(u, v)))
    return UnmaskPlan(tuple(sorted(u3)), tuple(corrections))


def _combine(shares: Mapping[int, bytes], threshold: int, what: str) -> bytes:
    try:
        return combine_shares(shares, threshold, SEED_BYTES)
    except ValueError as exc:
        raise SecAggAbandoned(f"cannot reconstruct {what}: {exc}") from None


def unmask_range(masked_sum: np.ndarray, plan: UnmaskPlan, start: int) -> np.ndarray:
    """The ring sum of the survivors' quantised values for elements ``start`` to
    ``start + len(masked_sum)``: ``masked_sum`` minus every mask of ``plan`` on that range."""
    out = np.array(masked_sum, dtype=np.uint32, copy=True)
    stop = start + out.size
    for seed, sign in plan.corrections:
        masked_sum_inplace(out, mask_words(seed, start, stop), -sign)
    return out


# -- the server's steps over the bucket --------------------------------------------------------


def _client_documents(
    store: ObjectStore, round_id: str, step: str, cls: type[DocumentT], layout: BucketLayout
) -> dict[str, DocumentT]:
    """``{client: document}`` of every well-formed ``step`` document whose ids match its path;
    the others are skipped (a client that cannot write a valid message has dropped)."""
    out: dict[str, DocumentT] = {}
    for info in list_secagg_documents(store, round_id, step, layout=layout).manifests:
        client, _ = layout.parse_secagg_client(info.name, step)
        try:
            doc, _ = read_document(store, info.name, cls)
        except (SchemaError, StorageError):
            continue
        if getattr(doc, "client_id", None) == client and getattr(doc, "round_id", None) == round_id:
            out[client] = doc
    return out


def publish_setup(
    store: ObjectStore,
    round_id: str,
    *,
    clip_norm: float,
    max_clients: int,
    degree: int | None = None,
    threshold: int | None = None,
    layout: BucketLayout = LAYOUT,
) -> Setup:
    """After phase 1: every client that posted well-formed keys is a member; write the setup."""
    advertised = {}
    for client, doc in sorted(_client_documents(store, round_id, "keys", SecAggKeys, layout).items())[:max_clients]:
        try:
            cipher, mask = unb64(doc.cipher_public, "key"), unb64(doc.mask_public, "key")
        except InvalidShare:
            continue
        if len(cipher) == 32 and len(mask) == 32:
            advertised[client] = Advertised(cipher, mask)
    if len(advertised) < 3:
        raise SecAggAbandoned(f"{len(advertised)} client(s) advertised keys; secure aggregation needs at least 3")
    setup = make_setup(round_id, advertised, degree=degree, threshold=threshold)
    document = setup_document(setup, clip_norm=clip_norm, max_clients=max_clients)
    write_document(store, layout.secagg_setup(round_id), document)
    return setup


def route_shares(store: ObjectStore, setup: Setup, *, layout: BucketLayout = LAYOUT) -> list[str]:
    """After phase 2: copy each sealed share into its receiver's inbox and publish who shared
    (the ``shared`` roster). A sender's shares count only if it addressed every neighbour."""
    inboxes: dict[str, dict[str, str]] = {c: {} for c in setup.keys}
    shared = []
    for sender, doc in sorted(_client_documents(store, setup.round_id, "shares", SecAggShares, layout).items()):
        if sender in setup.neighbours and set(doc.sealed) == set(setup.neighbours[sender]):
            shared.append(sender)
            for receiver, sealed in doc.sealed.items():
                inboxes[receiver][sender] = sealed
    for receiver in sorted(shared):
        inbox = {s: m for s, m in inboxes[receiver].items() if s in shared}
        doc = SecAggInbox(client_id=receiver, round_id=setup.round_id, sealed=inbox)
        write_document(store, layout.secagg_client(receiver, setup.round_id, "inbox"), doc)
    publish_roster(store, setup.round_id, "shared", shared, layout=layout)
    return shared


def publish_roster(
    store: ObjectStore, round_id: str, phase: str, clients: Sequence[str], *, layout: BucketLayout = LAYOUT
) -> None:
    doc = SecAggRoster(round_id=round_id, phase=phase, clients=sorted(clients))
    write_document(store, layout.secagg_roster(round_id, phase), doc)


def collect_unmasking(
    store: ObjectStore, round_id: str, *, layout: BucketLayout = LAYOUT
) -> dict[str, dict[str, tuple[str, bytes]]]:
    """After phase 4: each responder's revealed shares, ``{responder: {about: (kind, share)}}``. A
    response naming one client in both maps is dropped whole (the protocol forbids it)."""
    out: dict[str, dict[str, tuple[str, bytes]]] = {}
    for client, doc in _client_documents(store, round_id, "unmask", SecAggUnmask, layout).items():
        if set(doc.seeds) & set(doc.keys):
            continue
        try:
            answers = {v: ("seed", unb64(s, "share")) for v, s in doc.seeds.items()}
            answers |= {v: ("key", unb64(s, "share")) for v, s in doc.keys.items()}
        except InvalidShare:
            continue
        out[client] = answers
    return out
