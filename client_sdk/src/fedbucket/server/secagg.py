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

import math
import secrets
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import numpy as np

from fedbucket.protocol.documents import (
    AggregationReport,
    DocumentT,
    RoundClosing,
    RoundTask,
    SecAggInbox,
    SecAggKeys,
    SecAggRoster,
    SecAggSetup,
    SecAggShares,
    SecAggUnmask,
    SecureAggregationSummary,
    SecureAggregationTask,
    read_document,
    read_optional,
    utcnow,
    write_document,
)
from fedbucket.protocol.errors import (
    ConfigError,
    FedbucketError,
    LateUpdate,
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
    SchemaError,
    UpdateRejected,
)
from fedbucket.protocol.layout import LAYOUT, BucketLayout
from fedbucket.protocol.secagg import (
    MIN_SURVIVORS,
    SEED_BYTES,
    Advertised,
    InvalidShare,
    Setup,
    agree,
    combine_shares,
    mask_words,
    masked_sum_inplace,
    minimum_threshold,
    pair_context,
    pairwise_sign,
    public_bytes,
    seed_digest,
    setup_document,
    setup_from_document,
    unb64,
    usable_public_key,
)
from fedbucket.protocol.storage import ObjectStore
from fedbucket.protocol.validation import list_secagg_documents, rejection_verdict, validate_closed
from fedbucket.server.config import RoundSettings, SecureAggregationSettings, WaitSettings
from fedbucket.server.rounds import Survey, freeze_round


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


#: Up to this many members every client is every other's neighbour (the original SecAgg).
FULL_GRAPH_UP_TO = 32


def default_degree(members: int) -> int | None:
    """SecAgg+'s neighbourhood size when none is configured: everyone for small rounds, else
    ``2 * ceil(log2 n)`` rounded up to even (Bell et al. 2020: logarithmic in n)."""
    if members <= FULL_GRAPH_UP_TO:
        return None
    k = 2 * math.ceil(math.log2(members))
    return k + k % 2


def make_setup(
    round_id: str, advertised: Mapping[str, Advertised], *, degree: int | None = None, threshold: int | None = None
) -> Setup:
    """The setup the server publishes after phase 1 (``degree`` None: :func:`default_degree`).
    ``threshold`` (a floor) is raised to at least a strict majority of a client's share holders
    (its ``k`` neighbours and itself: :func:`~fedbucket.protocol.secagg.minimum_threshold`), so that
    no two conflicting views of who survived yield both of one client's secrets."""
    clients = sorted(advertised)
    neighbours = neighbour_graph(clients, degree if degree is not None else default_degree(len(clients)))
    smallest = min(len(v) for v in neighbours.values())
    largest = max(len(v) for v in neighbours.values())
    threshold = max(threshold or 0, minimum_threshold(largest))  # a configured one is a floor, never below
    if not max(2, minimum_threshold(largest)) <= threshold <= smallest:
        raise SecAggAbandoned(
            f"threshold {threshold} is impossible with neighbourhoods of {smallest} to {largest} client(s): it must "
            f"be a strict majority of a client's {largest + 1} share holders (at least {minimum_threshold(largest)}) "
            "and at most its neighbours"
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
    if len(u3) < max(setup.threshold, MIN_SURVIVORS):
        raise SecAggAbandoned(
            f"{len(u3)} masked input(s), fewer than the threshold of {setup.threshold} or the minimum of "
            f"{MIN_SURVIVORS}"
        )
    seed_shares: dict[str, dict[int, bytes]] = {}
    key_shares: dict[str, dict[int, bytes]] = {}
    for responder, answers in sorted(responses.items()):
        if responder not in u3:
            continue  # only survivors answer phase 4
        relevant = {  # about a neighbour, or the responder's own seed share (it survived: the seed is due)
            a: ks for a, ks in answers.items() if responder in setup.neighbours.get(a, ()) or a == responder
        }
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
        seed = _combine(
            shares, setup.threshold, f"{u}'s self-mask seed", lambda b, u=u: seed_digest(b) == setup.keys[u].seed_digest
        )
        corrections.append((seed, +1))
    for v in sorted(u2 - u3):  # shared keys, then dropped: remove the pairwise masks survivors added for it
        shares = key_shares.get(v, {})
        if len(shares) < setup.threshold:
            raise SecAggAbandoned(f"{len(shares)} share(s) of dropped {v}'s mask key, fewer than the threshold")
        private = _combine(
            shares,
            setup.threshold,
            f"dropped {v}'s mask key",
            lambda k, v=v: public_bytes(k) == setup.keys[v].mask_public,
        )
        for u in setup.neighbours[v]:
            if u in u3:
                try:
                    seed = agree(private, setup.keys[u].mask_public, "mask", pair_context(setup.round_id, u, v))
                except InvalidShare as exc:
                    raise SecAggAbandoned(f"cannot rebuild the mask between {u} and {v}: {exc}") from None
                corrections.append((seed, pairwise_sign(u, v)))
    return UnmaskPlan(tuple(sorted(u3)), tuple(corrections))


def _combine(shares: Mapping[int, bytes], threshold: int, what: str, genuine: Callable[[bytes], bool]) -> bytes:
    """The secret the shares rebuild, checked by ``genuine`` (the advertised seed digest or public
    key). With more shares than the threshold, one corrupted share is found by leaving each out in
    turn; otherwise a secret that fails the check abandons the round — never a wrong mask."""
    candidates = [dict(shares)]
    if len(shares) > threshold:
        candidates += [{x: y for x, y in shares.items() if x != left_out} for left_out in sorted(shares)]
    problem = "it does not match what its owner advertised"
    for subset in candidates:
        try:
            secret = combine_shares(subset, threshold, SEED_BYTES)
        except ValueError as exc:
            problem = str(exc)
            continue
        if genuine(secret):
            return secret
    raise SecAggAbandoned(f"cannot reconstruct {what}: {problem} (a corrupted share)")


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
    """``{client: document}`` of every well-formed ``step`` document whose ids match its path, in
    the order they were committed; the others are skipped (a client that cannot write a valid
    message has dropped)."""
    out: dict[str, DocumentT] = {}
    listed = list_secagg_documents(store, round_id, step, layout=layout).manifests
    for info in sorted(listed, key=lambda i: (i.updated, i.name)):
        client, _ = layout.parse_secagg_client(info.name, step)
        try:
            doc, _ = read_document(store, info.name, cls)
        except (SchemaError, ObjectTooLarge, ObjectNotFound):
            continue  # malformed, oversized or deleted: that client dropped (an unavailable store raises)
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
    excluded: Set[str] = frozenset(),
    layout: BucketLayout = LAYOUT,
) -> Setup:
    """After phase 1: every client that posted well-formed keys is a member (the first
    ``max_clients`` to arrive, none of ``excluded``: e.g. clients at the DP participation cap);
    write the setup once (a re-run returns the setup written first: the graph is not redrawn)."""
    existing, _ = read_optional(store, layout.secagg_setup(round_id), SecAggSetup)
    if existing is not None:
        return setup_from_document(existing)
    advertised = {}
    for client, doc in _client_documents(store, round_id, "keys", SecAggKeys, layout).items():
        if client in excluded:
            continue
        try:
            cipher, mask = unb64(doc.cipher_public, "key"), unb64(doc.mask_public, "key")
            digest = unb64(doc.seed_digest, "seed digest")
        except InvalidShare:
            continue
        usable = usable_public_key(cipher) and usable_public_key(mask) and len(digest) == 32
        if usable and len(advertised) < max_clients:
            advertised[client] = Advertised(cipher, mask, digest)  # well-formed keys first, then the cap
    if len(advertised) < 3:
        raise SecAggAbandoned(f"{len(advertised)} client(s) advertised keys; secure aggregation needs at least 3")
    setup = make_setup(round_id, advertised, degree=degree, threshold=threshold)
    document = setup_document(setup, clip_norm=clip_norm, max_clients=max_clients)
    try:
        write_document(store, layout.secagg_setup(round_id), document, if_generation_match=0)
    except PreconditionFailed:  # another attempt of this step won: everyone uses its setup
        written, _ = read_document(store, layout.secagg_setup(round_id), SecAggSetup)
        return setup_from_document(written)
    return setup


def route_shares(store: ObjectStore, setup: Setup, *, layout: BucketLayout = LAYOUT) -> list[str]:
    """After phase 2: copy each sealed share into its receiver's inbox and publish who shared
    (the ``shared`` roster). A sender's shares count only if it addressed every neighbour. Once
    the roster exists a re-run changes nothing and returns it."""
    existing, _ = read_optional(store, layout.secagg_roster(setup.round_id, "shared"), SecAggRoster)
    if existing is not None:
        return list(existing.clients)
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
    return publish_roster(store, setup.round_id, "shared", shared, layout=layout)


def publish_roster(
    store: ObjectStore, round_id: str, phase: str, clients: Sequence[str], *, layout: BucketLayout = LAYOUT
) -> list[str]:
    """Write a roster once (create-only) and return the clients it lists: a second writer gets the
    first one's list. Clients mask and unmask by what it says, so it must never change."""
    doc = SecAggRoster(round_id=round_id, phase=phase, clients=sorted(clients))
    try:
        write_document(store, layout.secagg_roster(round_id, phase), doc, if_generation_match=0)
    except PreconditionFailed:
        doc, _ = read_document(store, layout.secagg_roster(round_id, phase), SecAggRoster)
    return list(doc.clients)


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


# -- the round's phases as waits ----------------------------------------------------------------

#: The secure-aggregation waits of a round, in order; ``masked`` (phase 3) is the round's update wait.
SecAggPhase = Literal["keys", "shares", "unmask"]


@dataclass(frozen=True)
class Arrival:
    """One client's document of a phase, as listed (the store's commit time)."""

    client_id: str
    committed_at: datetime


@dataclass
class PhaseSurvey(Survey):
    """A phase's documents as they stand: from the clients the phase expects, on time."""


def secure_task(task: RoundTask) -> SecureAggregationTask:
    if task.secure_aggregation is None:
        raise ConfigError(f"round {task.round_id} does not use secure aggregation")
    return task.secure_aggregation


def phase_deadline(task: RoundTask, phase: SecAggPhase) -> datetime:
    secure = secure_task(task)
    return {"keys": secure.keys_deadline, "shares": secure.shares_deadline, "unmask": secure.unmask_deadline}[phase]


def expected_clients(
    store: ObjectStore, task: RoundTask, phase: SecAggPhase, *, layout: BucketLayout = LAYOUT
) -> list[str] | None:
    """Who a phase waits for: anyone (keys), the setup's members (shares), the clients whose masked
    input is in the sum (unmask)."""
    if phase == "keys":
        return None
    if phase == "shares":
        doc, _ = read_document(store, layout.secagg_setup(task.round_id), SecAggSetup)
        return sorted(doc.members)
    return read_roster_document(store, task.round_id, "masked", layout=layout)


def read_roster_document(store: ObjectStore, round_id: str, phase: str, *, layout: BucketLayout = LAYOUT) -> list[str]:
    doc, _ = read_document(store, layout.secagg_roster(round_id, phase), SecAggRoster)
    return list(doc.clients)


def survey_phase(
    store: ObjectStore,
    task: RoundTask,
    phase: SecAggPhase,
    expected: Sequence[str] | None,
    *,
    check_ready: bool = True,
    layout: BucketLayout = LAYOUT,
) -> PhaseSurvey:
    """The phase's documents listed now (names and commit times only: a poll reads no content;
    the step after the wait parses them and drops the malformed). Late ones count as rejected.
    For the unmasking, ``check_ready`` also tries the reconstruction (:attr:`PhaseSurvey.ready`)."""
    deadline = phase_deadline(task, phase)
    wanted = set(expected) if expected is not None else None
    survey = PhaseSurvey()
    listing = list_secagg_documents(store, task.round_id, phase, layout=layout)
    survey.ignored = listing.ignored
    for info in listing.manifests:
        client, _ = layout.parse_secagg_client(info.name, phase)
        if wanted is not None and client not in wanted:
            survey.ignored += 1
        elif info.updated > deadline:
            survey.rejected.append(
                rejection_verdict(client, LateUpdate(f"phase {phase} document committed after {deadline.isoformat()}"))
            )
        else:
            survey.on_time.append(Arrival(client, info.updated))
    if phase == "unmask" and expected is not None and check_ready:
        survey.ready = _unmasking_possible(store, task, expected, layout=layout)
    return survey


def _unmasking_possible(store: ObjectStore, task: RoundTask, survivors: Sequence[str], *, layout: BucketLayout) -> bool:
    """Whether the answers so far rebuild every secret the sum needs (read only once the threshold
    of answers is there: a poll before that reads nothing)."""
    setup = read_setup_document(store, task.round_id, layout=layout)
    responses = collect_unmasking(store, task.round_id, layout=layout)
    if len(set(responses) & set(survivors)) < setup.threshold:
        return False
    try:
        shared = read_roster_document(store, task.round_id, "shared", layout=layout)
        plan_unmasking(setup, shared, survivors, responses)
    except (SecAggAbandoned, InvalidShare, ValueError):  # not yet, or never: the deadline decides
        return False
    return True


def phase_wait_settings(
    task: RoundTask,
    phase: SecAggPhase | Literal["masked"],
    expected: Sequence[str] | None,
    *,
    round_settings: RoundSettings,
    secure: SecureAggregationSettings,
    threshold: int | None = None,
) -> WaitSettings:
    """When a phase's wait ends (:func:`~fedbucket.server.rounds.wait_decision`): the keys phase
    like a round's update wait; a later phase at once when everyone expected answered, once the
    quorum (the threshold; the round's quorum for masked inputs) is there and nothing arrived for
    ``grace`` seconds (the unmasking also only once every survivor's seed can be rebuilt), or at its
    deadline."""
    if phase == "keys":
        return WaitSettings(
            min_clients=max(3, round_settings.min_clients),
            max_clients=max(3, task.max_clients or round_settings.max_clients or 3),
            grace_seconds=round_settings.grace_seconds,
            min_clients_at_deadline=max(3, round_settings.quorum_at_deadline),
            settle_seconds=round_settings.settle_seconds,
            poll_seconds=round_settings.poll_seconds,
        )
    everyone = max(1, len(expected or ()))
    needed = survivors_needed(task, threshold or 2, round_settings.quorum_at_deadline)
    quorum = needed if phase == "masked" else threshold or 2  # the phase waits for who shared, not min_clients
    quorum = max(1, min(quorum, everyone))
    at_deadline = max(round_settings.quorum_at_deadline, needed) if phase == "masked" else quorum
    return WaitSettings(
        min_clients=quorum,
        max_clients=everyone,
        grace_seconds=max(secure.grace_seconds, round_settings.grace_seconds if phase == "masked" else 0.0),
        grace_after="last",  # a phase goes on while answers keep coming; one quiet grace period ends it
        min_clients_at_deadline=min(at_deadline, quorum),
        settle_seconds=round_settings.settle_seconds,
        poll_seconds=round_settings.poll_seconds,
    )


def survivors_needed(task: RoundTask, threshold: int, round_quorum: int) -> int:
    """The fewest masked inputs a secure round can release: the threshold, 3, the round's quorum
    and, with distributed DP, the survivors its noise was sized for."""
    secure = secure_task(task)
    needed = max(threshold, MIN_SURVIVORS, round_quorum)
    return max(needed, secure.min_survivors) if secure.noise_stddev > 0 else needed


def abandoned(store: ObjectStore, round_id: str, *, layout: BucketLayout = LAYOUT) -> str | None:
    """Why a secure round was abandoned, if it was (its aggregation report says so)."""
    report, _ = read_optional(store, layout.aggregation_report(round_id), AggregationReport)
    if report is not None and report.status == "below_quorum":
        return report.message
    closing, _ = read_optional(store, layout.round_closing(round_id), RoundClosing)
    return "the round closed below its quorum" if closing is not None and closing.reason == "below_quorum" else None


def setup_threshold(store: ObjectStore, round_id: str, *, layout: BucketLayout = LAYOUT) -> int:
    doc, _ = read_document(store, layout.secagg_setup(round_id), SecAggSetup)
    return doc.threshold


def read_setup_document(store: ObjectStore, round_id: str, *, layout: BucketLayout = LAYOUT) -> Setup:
    doc, _ = read_document(store, layout.secagg_setup(round_id), SecAggSetup)
    return setup_from_document(doc)


def publish_masked_roster(
    store: ObjectStore, task: RoundTask, closing: RoundClosing, *, minimum: int = MIN_SURVIVORS,
    layout: BucketLayout = LAYOUT,
) -> list[str]:  # fmt: skip
    """After phase 3 (the round's close): the clients whose masked input goes into the sum —
    those whose shares were delivered (nobody else's masks can be removed) and whose masked input
    passes every check now (sha256, size, format): once survivors reveal a client's seed share its
    input can no longer leave the sum, so a bad one must be found before. Written once; a re-run
    returns it. Fewer than ``minimum`` (the threshold, 3, or the survivors distributed DP noise
    was sized for): :class:`SecAggAbandoned`, and nothing is written."""
    existing, _ = read_optional(store, layout.secagg_roster(task.round_id, "masked"), SecAggRoster)
    if existing is not None:
        return list(existing.clients)
    shared = set(read_roster_document(store, task.round_id, "shared", layout=layout))
    masked = []
    for closed in sorted(closing.updates, key=lambda u: u.manifest.client_id):
        if closed.manifest.client_id not in shared:
            continue
        try:
            validate_closed(store, task, closed, layout=layout)
        except UpdateRejected:  # (an unreachable store raises: the step is retried, nobody is dropped for it)
            continue  # the aggregation report gives its code; here it is one more dropout
        masked.append(closed.manifest.client_id)
    if len(masked) < minimum:
        raise SecAggAbandoned(f"{len(masked)} valid masked input(s), fewer than the {minimum} this round needs")
    return publish_roster(store, task.round_id, "masked", masked, layout=layout)


def abandon_round(
    store: ObjectStore,
    task: RoundTask,
    *,
    message: str,
    strategy: str,
    min_clients: int,
    layout: BucketLayout = LAYOUT,
) -> None:
    """End a secure round that fell below a threshold before aggregation: the round is closed
    (``below_quorum`` if it was still open) and the aggregation report says why; nothing is released."""
    freeze_round(store, task, reason="below_quorum", closed_at=utcnow(), layout=layout)
    report = AggregationReport(
        round_id=task.round_id,
        status="below_quorum",
        base_model_version=task.base_model_version,
        strategy=strategy,
        min_clients=min_clients,
        message=message,
    )
    write_document(store, layout.aggregation_report(task.round_id), report)


@dataclass(frozen=True)
class SecureRoundState:
    """What the bucket says about a secure round when aggregation starts."""

    setup: Setup
    setup_document: SecAggSetup
    shared: tuple[str, ...]
    masked: tuple[str, ...]
    responses: Mapping[str, Mapping[str, tuple[str, bytes]]]

    def summary(self) -> SecureAggregationSummary:
        return SecureAggregationSummary(
            threshold=self.setup.threshold,
            clip_norm=self.setup_document.clip_norm,
            degree=min(len(v) for v in self.setup.neighbours.values()),
            advertised=sorted(self.setup.keys),
            shared=list(self.shared),
            masked=list(self.masked),
            responded=sorted(set(self.responses) & set(self.masked)),
            dropped_after_shares=sorted(set(self.shared) - set(self.masked)),
        )


def read_round_state(store: ObjectStore, task: RoundTask, *, layout: BucketLayout = LAYOUT) -> SecureRoundState:
    """The setup, the two rosters and the phase-4 answers of a secure round (a missing document
    means the round never got that far: :class:`SecAggAbandoned`)."""
    try:
        doc, _ = read_document(store, layout.secagg_setup(task.round_id), SecAggSetup)
        shared = read_roster_document(store, task.round_id, "shared", layout=layout)
        masked = read_roster_document(store, task.round_id, "masked", layout=layout)
    except ObjectNotFound as exc:
        raise SecAggAbandoned(f"the round's secure-aggregation documents are incomplete: {exc}") from None
    return SecureRoundState(
        setup=setup_from_document(doc),
        setup_document=doc,
        shared=tuple(shared),
        masked=tuple(masked),
        responses=collect_unmasking(store, task.round_id, layout=layout),
    )
