"""Sharded aggregation: the engine-independent half of the Spark job.

The model's elements, in the base file's tensor order, are cut into *shards* of at most
``max_elements`` elements (a shard is a run of ``(tensor, start, stop)`` pieces). One shard is one
unit of work: :func:`aggregate_shard` reads that element range from the base model, the previous
server state and every accepted update (byte-range reads; contiguous pieces merged into one read),
combines the clients in client-id order in float64 and returns the new values in the tensor's
dtype. Memory per shard is O(shard) for mean-based strategies whatever the number of clients, and
because every element is computed from the same inputs in the same order, the bytes of the result
do not depend on the shard size or on how shards are spread over workers.

The candidate file is the base file's header followed by the shards' outputs in shard order,
and the server state file is laid out the same way (:func:`output_files`). The workers write their
shards' bytes into both files themselves (assembled objects, see
:class:`~fedbucket.protocol.storage.Assembly`): the driver never holds the model.

Where no norm decides a weight (no clipping, no central DP, no secure sum), validation and
aggregation share one pass: the updates' checks run in the same stage as the shards, which combine
every update that passed the close; if a check fails, the shards are combined again without it.
Both are the same function of the same inputs, so the bytes equal those of two passes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from fedbucket.protocol.documents import (
    FLOAT_DTYPES,
    AggregationReport,
    ClosedUpdate,
    ModelManifest,
    RoundClosing,
    RoundTask,
    UpdateVerdict,
    read_document,
    read_optional,
    utcnow,
    write_document,
)
from fedbucket.protocol.errors import (
    ConfigError,
    MalformedPayload,
    NotInSecureSum,
    NotSampled,
    ObjectNotFound,
    ParticipationCapReached,
    StorageError,
    UpdateRejected,
)
from fedbucket.protocol.layout import LAYOUT, BucketLayout
from fedbucket.protocol.secagg import Quantiser, element_offsets, update_schema
from fedbucket.protocol.storage import STREAM_CHUNK_BYTES, Assembly, ObjectStore, Part, cached_store
from fedbucket.protocol.tensors import NUMPY_DTYPES, Header, TensorInfo, read_header
from fedbucket.protocol.validation import check_schema, read_payload_header, rejection_verdict, validate_closed
from fedbucket.server.config import PrivacySettings
from fedbucket.server.engine import Engine, serial_engine
from fedbucket.server.privacy import (
    RoundNoise,
    adapt_clip_norm,
    charge_round,
    client_histories,
    clip_norm_for,
    distributed_mechanism,
    public_privacy,
    read_ledger,
    round_mechanism,
)
from fedbucket.server.rounds import survey_round
from fedbucket.server.secagg import (
    SecAggAbandoned,
    SecureRoundState,
    UnmaskPlan,
    plan_unmasking,
    read_round_state,
    unmask_range,
)
from fedbucket.server.strategies import Strategy, build_strategy, integer_mean_step

T = TypeVar("T")
U = TypeVar("U")

#: Default shard size: 4 Mi elements (16 MiB of float32 per client read, 32 MiB float64 accumulator).
DEFAULT_SHARD_ELEMENTS = 4 * 1024 * 1024
STATE_DTYPE = "F32"


@dataclass(frozen=True)
class Piece:
    tensor: str
    start: int  # element offsets within the flattened tensor
    stop: int


Shard = tuple[Piece, ...]


@dataclass(frozen=True)
class TensorLayout:
    """Where a tensor's bytes start in one file, and its dtype."""

    offset: int
    dtype: str

    @classmethod
    def of(cls, info: TensorInfo) -> TensorLayout:
        return cls(info.start, info.dtype)


@dataclass(frozen=True)
class UpdateSource:
    """One accepted update, as the shard workers need it."""

    client_id: str
    payload_name: str
    generation: int
    tensors: dict[str, TensorLayout]
    weight: float  # normalised example weight
    examples: int  # the example count the weight came from (after the round's cap): exact integer means
    scale: float  # norm-bounding factor


@dataclass(frozen=True)
class AggregationPlan:
    """Everything a shard worker needs; small and picklable (names and offsets, no data)."""

    store_url: str
    base_payload_name: str
    base_generation: int
    base_tensors: dict[str, TensorLayout]
    strategy_name: str
    strategy_options: dict[str, object]
    sources: tuple[UpdateSource, ...]
    state_payload_name: str | None = None
    state_tensors: dict[str, TensorLayout] = field(default_factory=dict)
    #: Differential privacy: the round's secret noise and its std on each averaged coordinate.
    noise: RoundNoise | None = None
    noise_stddev: float = 0.0
    #: Secure aggregation: the sources are masked inputs; their ring sum is unmasked, then averaged.
    secure: SecureSum | None = None
    #: Where each shard writes its values (and state); None: :func:`aggregate_shard` only returns them.
    outputs: ShardOutputs | None = None

    def strategy(self) -> Strategy:
        return build_strategy(self.strategy_name, dict(self.strategy_options))


@dataclass(frozen=True)
class SecureSum:
    """How a shard turns masked inputs into the mean update: sum the sources' uint32 words modulo
    2^32, remove the masks of ``unmask`` on the shard's element range (global element index =
    ``offsets[tensor]`` + the element's index in the tensor), de-quantise and divide by the count."""

    unmask: UnmaskPlan
    offsets: dict[str, int]
    quantiser: Quantiser


def plan_shards(header: Header, max_elements: int = DEFAULT_SHARD_ELEMENTS) -> list[Shard]:
    """Cut the model (in file order) into shards of at most ``max_elements`` elements."""
    if max_elements < 1:
        raise ValueError("max_elements must be at least 1")
    shards: list[Shard] = []
    current: list[Piece] = []
    room = max_elements
    for info in header.in_file_order():
        start = 0
        while start < info.numel:
            take = min(room, info.numel - start)
            current.append(Piece(info.name, start, start + take))
            start += take
            room -= take
            if room == 0:
                shards.append(tuple(current))
                current, room = [], max_elements
    if current:
        shards.append(tuple(current))
    return shards


def shard_elements_for(strategy: Strategy, clients: int, shard_bytes: int = 32 * 1024 * 1024) -> int:
    """A shard size that keeps a worker's float64 working set near ``shard_bytes``."""
    rows = clients if strategy.needs_all_deltas else 2
    return max(1024, shard_bytes // (8 * max(1, rows)))


def _read_pieces(
    store: ObjectStore, name: str, generation: int | None, layout: dict[str, TensorLayout], shard: Shard
) -> list[np.ndarray]:
    """The shard's pieces from one file, contiguous pieces merged into one range read."""
    spans: list[tuple[int, int, list[tuple[int, int, np.dtype]]]] = []
    for piece in shard:
        tensor = layout[piece.tensor]
        dtype = NUMPY_DTYPES[tensor.dtype]
        begin = tensor.offset + piece.start * dtype.itemsize
        end = tensor.offset + piece.stop * dtype.itemsize
        if spans and spans[-1][1] == begin:
            spans[-1] = (spans[-1][0], end, [*spans[-1][2], (begin, end, dtype)])
        else:
            spans.append((begin, end, [(begin, end, dtype)]))
    out: list[np.ndarray] = []
    for begin, end, parts in spans:
        data = store.read_range(name, begin, end, generation=generation)
        if len(data) != end - begin:
            raise StorageError(f"{name}: short read at bytes {begin}-{end}")
        view = memoryview(data)
        for part_begin, part_end, dtype in parts:
            out.append(np.frombuffer(view[part_begin - begin : part_end - begin], dtype=dtype))
    return out


def _flat(parts: Sequence[np.ndarray], dtype: type = np.float64) -> np.ndarray:
    return np.concatenate(parts, dtype=dtype) if parts else np.zeros(0, dtype=dtype)


@dataclass(frozen=True)
class ShardWritten:
    """What one shard wrote: the parts the driver joins into the candidate and the state file."""

    index: int
    candidate: Part
    state: tuple[Part, ...] = ()


def aggregate_shard(plan: AggregationPlan, index: int, shard: Shard) -> ShardWritten:
    """Aggregate shard ``index`` and write its values (and server state) where ``plan.outputs``
    says. A retried task writes the same bytes again; the driver joins the parts it was returned."""
    values, state = shard_values(plan, shard)
    return _write_shard(plan, index, values, state)


def _write_shard(plan: AggregationPlan, index: int, values: bytes, state: dict[str, bytes]) -> ShardWritten:
    assert plan.outputs is not None
    store = cached_store(plan.store_url)
    outputs = plan.outputs
    candidate = store.write_part(outputs.candidate, outputs.files.candidate_at[index], values)
    state_parts = ()
    if outputs.state is not None:
        state_parts = tuple(
            store.write_part(outputs.state, outputs.files.state_at[state_name][index], data)
            for state_name, data in state.items()
            if data
        )
    return ShardWritten(index, candidate, state_parts)


def shard_values(plan: AggregationPlan, shard: Shard) -> tuple[bytes, dict[str, bytes]]:
    """New values (each tensor's dtype, concatenated in piece order) and new server state of one shard."""
    store = cached_store(plan.store_url)
    strategy = plan.strategy()
    is_float = [plan.base_tensors[p.tensor].dtype in FLOAT_DTYPES for p in shard]
    float_pieces = tuple(p for p, f in zip(shard, is_float, strict=True) if f)

    def split(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        floats = [v for v, f in zip(parts, is_float, strict=True) if f]
        ints = [v for v, f in zip(parts, is_float, strict=True) if not f]
        return _flat(floats), _flat(ints, np.int64)  # integers stay integers: values above 2**53 survive

    base_float, base_int = split(
        _read_pieces(store, plan.base_payload_name, plan.base_generation, plan.base_tensors, shard)
    )
    weights = np.array([s.weight for s in plan.sources], dtype=np.float64)
    n = len(plan.sources)
    # where each piece lands in the float (or integer) vector of this shard
    spans, float_at, int_at = [], 0, 0
    for piece, floating in zip(shard, is_float, strict=True):
        count = piece.stop - piece.start
        spans.append((floating, float_at if floating else int_at, count))
        float_at, int_at = (float_at + count, int_at) if floating else (float_at, int_at + count)
    stacked = np.empty((n, base_float.size)) if strategy.needs_all_deltas else None
    combined = np.zeros(base_float.size)
    scratch = np.empty(base_float.size)
    int_rows = np.empty((n, base_int.size), dtype=np.int64)
    if plan.secure is not None:
        combined = _secure_mean(store, plan, plan.secure, float_pieces)
    for i, source in enumerate(plan.sources if plan.secure is None else ()):  # client-id order: same bits
        parts = _read_pieces(store, source.payload_name, source.generation, source.tensors, shard)
        for (floating, at, count), values in zip(spans, parts, strict=True):
            if not floating:
                int_rows[i, at : at + count] = values
            elif stacked is not None:
                np.multiply(values, source.scale, out=stacked[i, at : at + count], dtype=np.float64)
            else:
                # float32 in, float64 out, no temporary: combined += (weight * scale) * delta
                strategy.accumulate(
                    combined[at : at + count], values, source.weight * source.scale, scratch[at : at + count]
                )
    if stacked is not None:
        combined = strategy.combine(stacked, weights)
    if plan.noise is not None:  # DP: noise on the averaged clipped sum, element-addressed (any sharding)
        for piece, (floating, at, count) in zip(shard, spans, strict=True):
            if floating:
                noise = plan.noise.tensor_noise(piece.tensor, piece.start, piece.stop)
                combined[at : at + count] += plan.noise_stddev * noise
    new_float, state = strategy.step(
        base_float, combined, _read_state(store, plan, strategy, float_pieces, base_float.size)
    )
    if plan.noise is not None or plan.secure is not None or not base_int.size:
        # DP: integer buffers (e.g. batch counts) would release unnoised counts; secure aggregation
        # does not send them at all. Kept as they are in the base.
        new_int = base_int
    else:
        new_int = integer_mean_step(base_int, int_rows, [s.examples for s in plan.sources])

    out = bytearray()
    next_float = next_int = 0
    for piece, floating in zip(shard, is_float, strict=True):
        count = piece.stop - piece.start
        if floating:
            values, next_float = new_float[next_float : next_float + count], next_float + count
        else:
            values, next_int = new_int[next_int : next_int + count], next_int + count
        dtype = NUMPY_DTYPES[plan.base_tensors[piece.tensor].dtype]
        if not floating:  # an int32 buffer saturates at its range rather than wrapping
            values = np.clip(values, np.iinfo(dtype).min, np.iinfo(dtype).max)
        out += values.astype(dtype).tobytes()
    state_bytes = {name: v.astype(NUMPY_DTYPES[STATE_DTYPE]).tobytes() for name, v in state.items()}
    return bytes(out), state_bytes


def _secure_mean(store: ObjectStore, plan: AggregationPlan, secure: SecureSum, pieces: Shard) -> np.ndarray:
    """The mean update on the shard's float pieces from the masked inputs (float64, piece order)."""
    out = []
    count = len(plan.sources)
    for piece in pieces:
        total = np.zeros(piece.stop - piece.start, dtype=np.uint32)
        for source in plan.sources:  # uint32 addition wraps: the sum is modulo 2^32
            (words,) = _read_pieces(store, source.payload_name, source.generation, source.tensors, (piece,))
            np.add(total, words, out=total)
        ring_sum = unmask_range(total, secure.unmask, secure.offsets[piece.tensor] + piece.start)
        out.append(secure.quantiser.dequantise_sum(ring_sum, count) / count)
    return _flat(out)


def _read_state(
    store: ObjectStore, plan: AggregationPlan, strategy: Strategy, float_pieces: Shard, size: int
) -> dict[str, np.ndarray]:
    if not strategy.state_names:
        return {}
    if plan.state_payload_name is None:
        return strategy.init_state(size)
    state = {}
    for state_name in strategy.state_names:
        layout = {p.tensor: plan.state_tensors[state_tensor_name(state_name, p.tensor)] for p in float_pieces}
        state[state_name] = _flat(_read_pieces(store, plan.state_payload_name, None, layout, float_pieces))
    return state


def state_tensor_name(state_name: str, tensor: str) -> str:
    return f"{state_name}/{tensor}"


def _safetensors_header(
    entries: Iterable[tuple[str, str, Sequence[int]]], metadata: dict[str, str] | None = None
) -> bytes:
    """A safetensors header (length prefix included) for ``(name, dtype, shape)`` entries laid out
    contiguously in that order, padded so the data section is 8-byte aligned as safetensors writes it."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * NUMPY_DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _shard_bytes(shard: Shard, tensors: dict[str, TensorLayout], *, floats_only_as: str | None = None) -> int:
    """Bytes of a shard's values in the candidate (or, with ``floats_only_as``, of its float pieces
    in that dtype: the state file)."""
    total = 0
    for piece in shard:
        dtype = tensors[piece.tensor].dtype
        if floats_only_as is None:
            total += (piece.stop - piece.start) * NUMPY_DTYPES[dtype].itemsize
        elif dtype in FLOAT_DTYPES:
            total += (piece.stop - piece.start) * NUMPY_DTYPES[floats_only_as].itemsize
    return total


@dataclass(frozen=True)
class OutputFiles:
    """The candidate's and the state file's headers and where each shard's bytes go in them."""

    candidate_header: bytes
    candidate_sizes: tuple[int, ...]
    candidate_at: tuple[int, ...]
    state_header: bytes | None
    state_sizes: tuple[int, ...]
    state_at: dict[str, tuple[int, ...]]

    @property
    def candidate_size(self) -> int:
        return len(self.candidate_header) + sum(self.candidate_sizes)

    @property
    def state_size(self) -> int:
        return len(self.state_header or b"") + len(self.state_at) * sum(self.state_sizes)


def output_files(base_header: Header, strategy: Strategy, shards: Sequence[Shard]) -> OutputFiles:
    """Lay out the candidate (the base file's tensors, same order, dtypes and shapes, with the new
    values: shards in order fill its data section) and the server-optimiser state (for each state
    name, every float tensor in file order, float32; the strategy named in its metadata so another
    strategy never reuses it)."""
    tensors = {n: TensorLayout.of(t) for n, t in base_header.tensors.items()}
    ordered = base_header.in_file_order()
    candidate_header = _safetensors_header((t.name, t.dtype, t.shape) for t in ordered)  # type: ignore[misc]
    sizes = tuple(_shard_bytes(shard, tensors) for shard in shards)
    candidate_at = _starts(len(candidate_header), sizes)
    state_header, state_sizes, state_at = None, (), {}
    if strategy.state_names:
        floats = [t for t in ordered if t.dtype in FLOAT_DTYPES]
        state_header = _safetensors_header(
            ((state_tensor_name(s, t.name), STATE_DTYPE, t.shape) for s in strategy.state_names for t in floats),
            metadata={"strategy": strategy.name},
        )
        state_sizes = tuple(_shard_bytes(shard, tensors, floats_only_as=STATE_DTYPE) for shard in shards)
        section = sum(state_sizes)
        state_at = {
            name: _starts(len(state_header) + j * section, state_sizes) for j, name in enumerate(strategy.state_names)
        }
    return OutputFiles(candidate_header, sizes, candidate_at, state_header, state_sizes, state_at)


def _starts(first: int, sizes: Sequence[int]) -> tuple[int, ...]:
    """Where each of consecutive blocks of ``sizes`` bytes starts, the first at ``first``."""
    return tuple(itertools.accumulate(sizes[:-1], initial=first)) if sizes else ()


@dataclass(frozen=True)
class ShardOutputs:
    """Where the shards write their results: the candidate and the server-optimiser state are
    assembled by the workers themselves (:class:`~fedbucket.protocol.storage.Assembly`), so the
    driver never holds the model. The headers are written by the driver when it begins them."""

    files: OutputFiles
    candidate: Assembly
    candidate_header: Part
    state: Assembly | None = None
    state_header: Part | None = None


# ---------------------------------------------------------------------------------------------
# The driver: validate, plan, aggregate through an engine, write. Engine-independent.


@dataclass(frozen=True)
class _Validated:
    verdict: UpdateVerdict
    source: UpdateSource | None
    l2_norm: float = 0.0


def _validate_closed(store_url: str, task: RoundTask, exact_norm: bool, closed: ClosedUpdate) -> _Validated:
    store = cached_store(store_url)
    client_id = closed.manifest.client_id
    try:
        update = validate_closed(store, task, closed, exact_norm=exact_norm)
    except UpdateRejected as exc:
        return _Validated(rejection_verdict(client_id, exc, closed.committed_at), None)
    except StorageError as exc:  # the client deleted or replaced its payload under us
        error = MalformedPayload(f"payload could not be read consistently: {exc}")
        return _Validated(rejection_verdict(client_id, error, closed.committed_at), None)
    source = UpdateSource(
        client_id=client_id,
        payload_name=update.payload_name,
        generation=update.payload_generation,
        tensors={n: TensorLayout.of(t) for n, t in update.header.tensors.items()},
        weight=0.0,  # set once every update is validated
        examples=update.manifest.num_examples,
        scale=1.0,
    )
    verdict = update.verdict()
    cap = task.max_examples_per_update
    if cap is not None and update.manifest.num_examples > cap:  # a claim beyond the round's bound
        source = dataclasses.replace(source, examples=cap)
        verdict.reason = f"num_examples {update.manifest.num_examples} clamped to the round's cap of {cap}"
    return _Validated(verdict, source, update.l2_norm)


def round_inputs(store: ObjectStore, task: RoundTask, *, layout: BucketLayout = LAYOUT) -> RoundClosing:
    """The frozen closing document if the round was closed, else the updates as they stand now."""
    closing, _ = read_optional(store, layout.round_closing(task.round_id), RoundClosing)
    if closing is not None:
        return closing
    return survey_round(store, task, layout=layout).closing(task.round_id, reason="deadline", closed_at=utcnow())


def run_aggregation(
    store: ObjectStore,
    round_id: str,
    strategy: Strategy,
    *,
    engine: Engine = serial_engine,
    min_clients: int | None = None,
    shard_elements: int | None = None,
    engine_info: dict[str, object] | None = None,
    privacy: PrivacySettings | None = None,
    noise_key: bytes | None = None,
    layout: BucketLayout = LAYOUT,
    log: Callable[[str], None] = lambda message: None,
) -> AggregationReport:
    """Aggregate one round into ``rounds/<round>/candidate/`` and write its aggregation report.

    Returns the report; ``report.status == "below_quorum"`` when fewer than ``min_clients``
    (default: the task's) updates are valid, in which case no candidate is written.

    With ``privacy.dp`` the round runs DP-FedAvg (:mod:`fedbucket.server.privacy`): updates of
    clients at the participation cap (or left out by the secret Poisson draw) are refused before
    they are read, the rest are clipped and summed with equal weights over a fixed denominator,
    noise from ``noise_key`` (the server's secret) is added, and the round is charged in the
    privacy ledger before the candidate is written.
    """
    started = time.perf_counter()
    task, _ = read_document(store, layout.round_task(round_id), RoundTask)
    quorum = task.min_clients if min_clients is None else min_clients
    closing = round_inputs(store, task, layout=layout)
    updates = sorted(closing.updates, key=lambda u: u.manifest.client_id)
    dp = privacy if privacy is not None and privacy.dp else None
    distributed = task.secure_aggregation is not None and task.secure_aggregation.noise_stddev > 0
    if distributed and dp is None:
        raise ConfigError(f"round {round_id} was opened with distributed DP: aggregate it with its privacy settings")
    if task.secure_aggregation is not None and dp is not None and not distributed:
        raise ConfigError(f"round {round_id} was opened without distributed DP noise: dp cannot be added afterwards")
    central = dp if task.secure_aggregation is None else None  # DP-FedAvg: the server adds the noise
    refused: list[UpdateVerdict] = []
    if central is not None:
        if noise_key is None:
            raise ConfigError("differential privacy needs the server's noise key (FEDBUCKET_DP_KEY)")
        noise = RoundNoise.derive(noise_key, round_id)
        ledger, ledger_generation = read_ledger(store, layout=layout)  # one read: admission and charge agree
        updates, charged, refused = _privacy_admission(
            updates, client_histories(ledger, excluding=round_id), central, noise
        )
        mechanism = round_mechanism(
            central, min_clients=task.min_clients, clip_norm=clip_norm_for(ledger, round_id, central)
        )
    secure = None
    if task.secure_aggregation is not None:
        _check_secure_strategy(strategy)
        try:
            secure = read_round_state(store, task, layout=layout)
            unmask = plan_unmasking(secure.setup, secure.shared, secure.masked, secure.responses)
        except SecAggAbandoned as exc:
            return _abandoned(store, task, strategy, quorum, closing, secure, str(exc), started, layout, log)
        in_sum, shared = set(secure.masked), set(secure.shared)
        refused = [_outside_the_sum(store, task, u, shared) for u in updates if u.manifest.client_id not in in_sum]
        updates = [u for u in updates if u.manifest.client_id in in_sum]
        if len(updates) != len(in_sum):  # the roster was written from this very closing
            return _abandoned(
                store, task, strategy, quorum, closing, secure, "the masked roster and the closing disagree", started,
                layout, log,
            )  # fmt: skip
    exact_norm = strategy.clip_norm is not None or central is not None  # the norm scales the update: deterministic
    base_manifest, _ = read_document(store, layout.model_manifest(task.base_model_version), ModelManifest)
    base_name = layout.model_payload(base_manifest.version)
    base_info = store.stat(base_name)
    base_header = read_payload_header(store, base_name, base_info.generation, base_info.size)
    state_name, state_tensors, state_note = _previous_state(store, base_manifest, strategy, layout)
    plan = AggregationPlan(
        store_url=store.url,
        base_payload_name=base_name,
        base_generation=base_info.generation,
        base_tensors={n: TensorLayout.of(t) for n, t in base_header.tensors.items()},
        strategy_name=strategy.name,
        strategy_options=strategy.options(),
        sources=(),
        state_payload_name=state_name,
        state_tensors=state_tensors,
    )
    timings: dict[str, float] = {}
    outputs: ShardOutputs | None = None
    shards: list[Shard] = []
    optimistic: tuple[UpdateSource, ...] = ()
    failed: list[_ShardFailed] = []
    written: list[ShardWritten] = []
    try:
        # One pass where no norm decides a weight (no clipping, no central DP, no secure sum): every
        # update is checked in the same Spark stage that combines the shards from all the updates
        # that passed the close; only if a check fails are the shards combined again without it.
        # Both runs are the same function of the same inputs, so the bytes are those of two passes.
        if secure is None and not exact_norm and updates:
            t0 = time.perf_counter()
            headers = engine(functools.partial(_read_source, store.url, task, layout), updates)
            optimistic = _with_weights([h for h in headers if h is not None], secure=False)
            timings["read_headers_s"] = time.perf_counter() - t0
            if len(optimistic) < max(quorum, 1) or not _enough_for(strategy, len(optimistic)):
                optimistic = ()
        t0 = time.perf_counter()
        if optimistic:
            shards = plan_shards(base_header, shard_elements or shard_elements_for(strategy, len(optimistic)))
            outputs = _begin_outputs(store, layout, round_id, base_header, strategy, shards)
            log(
                f"round {round_id}: validating {len(updates)} update(s) ({len(closing.late)} late or unreadable) "
                f"while aggregating them in {len(shards)} shard(s), one pass"
            )
            checked = dataclasses.replace(plan, sources=optimistic, outputs=outputs)
            items: list[ClosedUpdate | tuple[int, Shard]] = _interleave(updates, list(enumerate(shards)))
            results = engine(functools.partial(_check_or_combine, store.url, task, checked), items)
            written = [r for r in results if isinstance(r, ShardWritten)]
            validated = [r for r in results if isinstance(r, _Validated)]
            failed = [r for r in results if isinstance(r, _ShardFailed)]
            timings["validate_and_aggregate_s"] = time.perf_counter() - t0
        else:
            log(f"round {round_id}: validating {len(updates)} update(s) ({len(closing.late)} late or unreadable)")
            validated = engine(functools.partial(_validate_closed, store.url, task, exact_norm), updates)
            timings["validate_s"] = time.perf_counter() - t0
        accepted = [v for v in validated if v.source is not None]
        if secure is not None and len(accepted) != len(validated):  # a masked input that fails cannot leave the sum
            bad = ", ".join(f"{v.verdict.client_id} ({v.verdict.code})" for v in validated if v.source is None)
            return _abandoned(
                store, task, strategy, quorum, closing, secure, f"masked input(s) failed validation: {bad}", started,
                layout, log, verdicts=[v.verdict for v in validated] + refused,
            )  # fmt: skip
        sources = tuple(
            dataclasses.replace(
                source,
                scale=_dp_clip_scale(mechanism.clip_norm, v.l2_norm)
                if central is not None
                else 1.0
                if secure is not None
                else strategy.client_scale(v.l2_norm),
            )
            for v, source in zip(accepted, _with_weights(
                [v.source for v in accepted if v.source is not None],
                dp=mechanism.denominator if central is not None else None,  # DP: equal weights over a fixed denominator
                secure=secure is not None,
            ), strict=True)
        )  # fmt: skip
        verdicts = [v.verdict.model_copy(update={"weight": s.weight}) for v, s in zip(accepted, sources, strict=True)]
        verdicts += [v.verdict for v in validated if v.source is None] + refused + list(closing.late)
        verdicts.sort(key=lambda v: (not v.accepted, v.client_id))
        for v in verdicts:
            detail = f"weight {v.weight:.4f}" + (f" ({v.reason})" if v.reason else "") if v.accepted else v.reason
            log(f"  {'ACCEPT' if v.accepted else 'REJECT'} {v.client_id}: {detail}")
        report = AggregationReport(
            round_id=round_id,
            status="below_quorum",
            base_model_version=task.base_model_version,
            strategy=strategy.name,
            strategy_options=strategy.options(),
            min_clients=quorum,
            updates=verdicts,
            engine=dict(engine_info or {}),
            secure_aggregation=secure.summary() if secure is not None else None,
        )
        if len(sources) >= quorum:
            strategy.check_clients(len(sources))
        if len(sources) < quorum:
            report.message = f"{len(sources)} valid update(s), fewer than the quorum of {quorum}: no candidate"
            report.timings = {**timings, "total_s": time.perf_counter() - started}
            write_document(store, layout.aggregation_report(round_id), report)
            log(report.message)
            return report

        plan = dataclasses.replace(plan, sources=sources)
        if secure is not None:
            secure_settings = task.secure_aggregation
            quantiser = Quantiser(secure_settings.clip_norm, secure_settings.levels)
            plan = dataclasses.replace(plan, secure=SecureSum(unmask, element_offsets(task.tensors), quantiser))
            log(
                f"secure aggregation: {len(sources)} masked input(s) summed modulo 2^32; {len(unmask.corrections)} "
                f"mask(s) to remove ({len(secure.shared) - len(secure.masked)} client(s) dropped after sharing "
                f"keys), threshold {secure.setup.threshold}, updates clipped to {quantiser.clip:g}"
            )
        round_privacy = None
        if distributed:  # the clients added the noise; it is charged before anything is released
            assert dp is not None and secure is not None and task.secure_aggregation is not None
            if len(sources) < task.secure_aggregation.min_survivors:
                return _abandoned(
                    store, task, strategy, quorum, closing, secure,
                    f"{len(sources)} masked input(s): the distributed noise was sized for at least "
                    f"{task.secure_aggregation.min_survivors}, so their sum would be less private than charged",
                    started, layout, log, verdicts=verdicts,
                )  # fmt: skip
            ledger, ledger_generation = read_ledger(store, layout=layout)
            mechanism = distributed_mechanism(
                task.secure_aggregation.noise_multiplier
                or dp.noise_multiplier,  # what the clients' noise was sized for
                clip_norm=task.secure_aggregation.clip_norm,
                levels=task.secure_aggregation.levels,
                client_stddev=task.secure_aggregation.noise_stddev,
                survivors=len(sources),
            )
            round_privacy = charge_round(
                store, round_id, mechanism, [s.client_id for s in sources], dp, ledger=ledger,
                generation=ledger_generation, layout=layout,
            )  # fmt: skip
            report.privacy = round_privacy
            log(
                f"distributed dp: {len(sources)} clients' discrete Gaussian noise (std {mechanism.noise_stddev:.4g} "
                f"per averaged coordinate, z={mechanism.noise_multiplier:g}); epsilon "
                f"{round_privacy.spent.epsilon:.3f} at delta {round_privacy.spent.delta:g} after this round"
            )
        if central is not None:
            unclipped = sum(1 for v in accepted if v.l2_norm <= mechanism.clip_norm)
            next_clip, share = adapt_clip_norm(
                mechanism, unclipped=unclipped, participants=len(sources), noise=noise.count_noise()
            )
            mechanism = mechanism.model_copy(update={"next_clip_norm": next_clip, "unclipped_fraction": share})
            if central.sampling_rate is None:  # no amplification: charged = the clients whose updates are in the sum
                charged = [s.client_id for s in sources]
            round_privacy = charge_round(  # before any release
                store, round_id, mechanism, charged, central, ledger=ledger, generation=ledger_generation,
                layout=layout,
            )  # fmt: skip
            plan = dataclasses.replace(plan, noise=noise, noise_stddev=mechanism.noise_stddev)
            report.privacy = round_privacy
            log(
                f"dp: clip norm {mechanism.clip_norm:.4g} ({unclipped} of {len(sources)} update(s) unclipped; next "
                f"{next_clip:.4g}), noise std {mechanism.noise_stddev:.4g} per coordinate "
                f"(z={mechanism.noise_multiplier:g}, z_delta={mechanism.update_noise_multiplier:.4g}, "
                f"n-bar={mechanism.denominator:g}); epsilon {round_privacy.spent.epsilon:.3f} at delta "
                f"{round_privacy.spent.delta:g} after this round"
            )
        if outputs is None:  # two passes: the norms had to be known before anything was weighted
            shards = plan_shards(base_header, shard_elements or shard_elements_for(strategy, len(sources)))
            outputs = _begin_outputs(store, layout, round_id, base_header, strategy, shards)
            log(
                f"aggregating {len(sources)} update(s) with {strategy.describe()} in {len(shards)} shard(s){state_note}"
            )
            t0 = time.perf_counter()
            written = _combine(engine, dataclasses.replace(plan, outputs=outputs), shards)
            timings["aggregate_s"] = time.perf_counter() - t0
        elif sources != optimistic or failed:
            # Combined again, into a fresh file: a late task of the first pass can only write into
            # the dropped one. Same function of the same inputs: the bytes of two passes.
            dropped = len({s.client_id for s in optimistic} - {s.client_id for s in sources})
            log(
                f"{dropped} update(s) combined in the first pass failed a check"
                + (f"; {len(failed)} shard(s) could not read an update ({failed[0].error})" if failed else "")
                + f": combining the {len(sources)} accepted again in {len(shards)} shard(s)"
            )
            t0 = time.perf_counter()
            _abort_outputs(store, outputs)
            outputs = None
            outputs = _begin_outputs(store, layout, round_id, base_header, strategy, shards)
            written = _combine(engine, dataclasses.replace(plan, outputs=outputs), shards)
            timings["recompute_s"] = time.perf_counter() - t0
        else:
            log(f"aggregated {len(sources)} update(s) with {strategy.describe()}{state_note}")

        t0 = time.perf_counter()
        candidate_name = layout.candidate_payload(round_id)
        if outputs.state is not None and outputs.state_header is not None:  # first: a candidate always has its state
            store.finish_assembly(outputs.state, [outputs.state_header, *(p for w in written for p in w.state)])
        candidate_info = store.finish_assembly(
            outputs.candidate, [outputs.candidate_header, *(w.candidate for w in written)]
        )
        outputs = None  # committed: nothing left to abort
        sha = _sha256_of(store, candidate_name, candidate_info.generation)
        manifest = ModelManifest(
            version=round_id,
            sha256=sha,
            size_bytes=candidate_info.size,
            tensors=base_header.schema(),
            model=task.model,
            base_version=task.base_model_version,
            round_id=round_id,
            lineage=_lineage(
                strategy, sources, verdicts, public_privacy(round_privacy, dp) if round_privacy is not None else None
            ),
        )
        write_document(store, layout.candidate_manifest(round_id), manifest)
        timings["write_s"] = time.perf_counter() - t0
    finally:
        if outputs is not None:  # below quorum, abandoned or failed: nothing of it is released
            _abort_outputs(store, outputs)
    report.status = "aggregated"
    report.candidate_sha256 = sha
    report.engine["shards"] = len(shards)
    report.engine["passes"] = 1 if optimistic and sources == optimistic and not failed else 2
    report.message = f"{len(sources)} of {len(verdicts)} update(s) accepted; candidate sha256 {sha[:12]}"
    report.timings = {**timings, "total_s": time.perf_counter() - started}
    write_document(store, layout.aggregation_report(round_id), report)
    log(report.message)
    return report


def _combine(engine: Engine, plan: AggregationPlan, shards: list[Shard]) -> list[ShardWritten]:
    return engine(functools.partial(_aggregate_indexed, plan), list(enumerate(shards)))


def _begin_outputs(
    store: ObjectStore,
    layout: BucketLayout,
    round_id: str,
    base_header: Header,
    strategy: Strategy,
    shards: list[Shard],
) -> ShardOutputs:
    """Start assembling the candidate (and state file) and write their headers; the shards write the rest."""
    files = output_files(base_header, strategy, shards)
    candidate = store.begin_assembly(layout.candidate_payload(round_id), files.candidate_size)
    state = None
    try:
        candidate_header = store.write_part(candidate, 0, files.candidate_header)
        state_header = None
        if files.state_header is not None:
            state = store.begin_assembly(layout.strategy_state(round_id), files.state_size)
            state_header = store.write_part(state, 0, files.state_header)
    except BaseException:
        store.abort_assembly(candidate)
        if state is not None:
            store.abort_assembly(state)
        raise
    return ShardOutputs(files, candidate, candidate_header, state, state_header)


def _abort_outputs(store: ObjectStore, outputs: ShardOutputs) -> None:
    store.abort_assembly(outputs.candidate)
    if outputs.state is not None:
        store.abort_assembly(outputs.state)


def _sha256_of(store: ObjectStore, name: str, generation: int) -> str:
    """The sha256 of one generation of an object, streamed (bounded memory)."""
    hasher = hashlib.sha256()
    with store.open_reader(name, generation=generation) as fp:
        while chunk := fp.read(STREAM_CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


def _with_weights(sources: Sequence[UpdateSource], *, dp: int | None = None, secure: bool) -> tuple[UpdateSource, ...]:
    total = sum(s.examples for s in sources)
    return tuple(dataclasses.replace(s, weight=_weight(s, total, len(sources), dp=dp, secure=secure)) for s in sources)


def _enough_for(strategy: Strategy, clients: int) -> bool:
    try:
        strategy.check_clients(clients)
    except ConfigError:
        return False
    return True


def _interleave(first: Sequence[T], second: Sequence[U]) -> list[T | U]:
    """Alternate the two lists (the rest of the longer one at the end), so every contiguous run of
    items an engine gives one task holds some of each kind."""
    out: list[T | U] = []
    for a, b in itertools.zip_longest(first, second, fillvalue=_MISSING):
        out += [x for x in (a, b) if x is not _MISSING]
    return out


_MISSING = object()


def _read_source(store_url: str, task: RoundTask, layout: BucketLayout, closed: ClosedUpdate) -> UpdateSource | None:
    """An update as the shards need it, from its header alone (None if that cannot be read: the
    update's check then gives the reason)."""
    store = cached_store(store_url)
    manifest = closed.manifest
    name = layout.update_payload(manifest.client_id, manifest.round_id, manifest.sha256)
    try:
        header = read_payload_header(store, name, closed.payload_generation, manifest.size_bytes)
        check_schema(header, update_schema(task))
    except (UpdateRejected, StorageError):
        return None
    cap = task.max_examples_per_update
    return UpdateSource(
        client_id=manifest.client_id,
        payload_name=name,
        generation=closed.payload_generation,
        tensors={n: TensorLayout.of(t) for n, t in header.tensors.items()},
        weight=0.0,
        examples=manifest.num_examples if cap is None else min(manifest.num_examples, cap),
        scale=1.0,
    )


@dataclass(frozen=True)
class _ShardFailed:
    index: int
    error: str


def _check_or_combine(
    store_url: str, task: RoundTask, plan: AggregationPlan, item: ClosedUpdate | tuple[int, Shard]
) -> _Validated | ShardWritten | _ShardFailed:
    """One item of the one-pass stage: check an update, or combine a shard."""
    if isinstance(item, ClosedUpdate):
        return _validate_closed(store_url, task, False, item)
    index, shard = item
    try:
        values, state = shard_values(plan, shard)
    except StorageError as exc:  # reading an update replaced since the close: its check rejects it, shards rerun
        return _ShardFailed(index, str(exc))
    return _write_shard(plan, index, values, state)  # a failure to write is the job's, not a client's


def _outside_the_sum(store: ObjectStore, task: RoundTask, closed: ClosedUpdate, shared: set[str]) -> UpdateVerdict:
    """The verdict of an update left out of a secure sum: its masked input failed its checks at the
    close (the same checks again give the code), or its shares never reached the others."""
    if closed.manifest.client_id in shared:
        verdict = _validate_closed(store.url, task, True, closed).verdict
        if not verdict.accepted:
            return verdict
        error = NotInSecureSum("it is not in the masked roster written when the round closed")
    else:
        error = NotInSecureSum("its phase-2 shares were not delivered: its masks could not be removed")
    return rejection_verdict(closed.manifest.client_id, error, closed.committed_at)


def _weight(source: UpdateSource, total_examples: int, count: int, *, dp: int | None, secure: bool) -> float:
    """An accepted update's weight: equal over DP's fixed denominator, equal under secure aggregation
    (the server cannot weight what it cannot see), else its share of the examples (FedAvg)."""
    if dp is not None:
        return 1 / dp
    if secure:
        return 1 / count
    return source.examples / total_examples


def _check_secure_strategy(strategy: Strategy) -> None:
    """Refuse what secure aggregation cannot do (the config refuses it first; the task is the truth)."""
    if strategy.needs_all_deltas or strategy.clip_norm is not None:
        raise ConfigError(
            f"strategy {strategy.describe()} cannot run under secure aggregation: the server sees only the sum "
            "of the updates (use fedavg or a server optimiser, without clip_norm)"
        )


def _abandoned(
    store: ObjectStore,
    task: RoundTask,
    strategy: Strategy,
    quorum: int,
    closing: RoundClosing,
    secure: SecureRoundState | None,
    reason: str,
    started: float,
    layout: BucketLayout,
    log: Callable[[str], None],
    verdicts: list[UpdateVerdict] | None = None,
) -> AggregationReport:
    """A secure round that cannot be unmasked: below-quorum report with the reason; nothing released."""
    report = AggregationReport(
        round_id=task.round_id,
        status="below_quorum",
        base_model_version=task.base_model_version,
        strategy=strategy.name,
        strategy_options=strategy.options(),
        min_clients=quorum,
        updates=sorted([*(verdicts or []), *closing.late], key=lambda v: (not v.accepted, v.client_id)),
        message=f"secure aggregation abandoned: {reason}",
        timings={"total_s": time.perf_counter() - started},
        secure_aggregation=secure.summary() if secure is not None else None,
    )
    write_document(store, layout.aggregation_report(task.round_id), report)
    log(report.message)
    return report


def _lineage(
    strategy: Strategy, sources: Sequence[UpdateSource], verdicts: Sequence[UpdateVerdict], privacy: dict | None
) -> dict[str, object]:
    """The candidate's lineage (public once promoted: every client reads model manifests).

    Under DP it names no client and counts none: who took part, how many did, a clipped update's
    scale (which gives its norm) and who the secret sample left out are facts about individuals the
    guarantee does not cover; the server-only aggregation report and ledger keep them."""
    lineage: dict[str, object] = {"strategy": strategy.name, "strategy_options": strategy.options()}
    if privacy is None:
        lineage["accepted"] = [{"client_id": s.client_id, "weight": s.weight, "clip_scale": s.scale} for s in sources]
        lineage["rejected"] = [{"client_id": v.client_id, "code": v.code} for v in verdicts if not v.accepted]
        return lineage
    lineage["privacy"] = privacy
    return lineage


def _dp_clip_scale(clip_norm: float, l2_norm: float) -> float:
    return 1.0 if l2_norm <= clip_norm else clip_norm / l2_norm


def _privacy_admission(
    updates: list[ClosedUpdate], histories: dict, settings: PrivacySettings, noise: RoundNoise
) -> tuple[list[ClosedUpdate], list[str], list[UpdateVerdict]]:
    """Before any payload is read: refuse updates of clients at the participation cap, then (with
    server-side sampling) keep each remaining one with the round's secret probability ``q``.
    Returns the updates to validate, the clients the round is charged to when sampling (every
    client that passed the cap: being left out is part of the sampled mechanism) and the refusals."""
    kept: list[ClosedUpdate] = []
    eligible: list[str] = []
    refused: list[UpdateVerdict] = []
    for closed in updates:
        client_id = closed.manifest.client_id
        taken = sum(histories.get(client_id, {}).values())
        if taken >= settings.max_participations:
            error: UpdateRejected = ParticipationCapReached(
                f"already charged for {taken} differentially private round(s); the cap is {settings.max_participations}"
            )
            refused.append(rejection_verdict(client_id, error, closed.committed_at))
            continue
        eligible.append(client_id)
        if settings.sampling_rate is not None and not noise.sampled(client_id, settings.sampling_rate):
            error = NotSampled(f"left out by the round's secret Poisson draw (q={settings.sampling_rate:g})")
            refused.append(rejection_verdict(client_id, error, closed.committed_at))
            continue
        kept.append(closed)
    return kept, eligible, refused


def _aggregate_indexed(plan: AggregationPlan, item: tuple[int, Shard]) -> ShardWritten:
    return aggregate_shard(plan, *item)


def _previous_state(
    store: ObjectStore, base: ModelManifest, strategy: Strategy, layout: BucketLayout
) -> tuple[str | None, dict[str, TensorLayout], str]:
    """The server-optimiser state saved by the round that produced the base model, if usable."""
    if not strategy.state_names:
        return None, {}, ""
    if base.round_id is None:
        return None, {}, "; fresh optimiser state (base is the initial model)"
    name = layout.strategy_state(base.round_id)
    try:
        info = store.stat(name)
    except ObjectNotFound:
        return None, {}, f"; fresh optimiser state (none saved by round {base.round_id})"
    with store.open_reader(name, generation=info.generation) as fp:
        header = read_header(fp, info.size)
    wanted = {
        state_tensor_name(s, t)
        for s in strategy.state_names
        for t, spec in base.tensors.items()
        if spec.dtype in FLOAT_DTYPES
    }
    if header.metadata.get("strategy") != strategy.name or not wanted <= set(header.tensors):
        saved = header.metadata.get("strategy", "another strategy")
        return None, {}, f"; fresh optimiser state (round {base.round_id} saved {saved}'s state)"
    return (
        name,
        {n: TensorLayout.of(t) for n, t in header.tensors.items()},
        f"; optimiser state from round {base.round_id}",
    )
