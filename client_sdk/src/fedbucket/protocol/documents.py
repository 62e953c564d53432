"""The JSON documents of the bucket protocol, one pydantic model each.

Every document carries ``kind`` (which model it is) and ``schema_version`` (which version of it).
Readers call :func:`parse_document`, which refuses a version it does not know with
:class:`~fedbucket.protocol.errors.UnsupportedSchemaVersion` before looking at anything else, so an old
server never half-understands a newer client (or the reverse). Unknown fields are errors too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedbucket.protocol.errors import ObjectNotFound, SchemaError, UnsupportedSchemaVersion
from fedbucket.protocol.layout import IDENTIFIER_PATTERN
from fedbucket.protocol.storage import ObjectStore

#: The protocol version this package writes and the versions it reads. Version 2 added task
#: packages (``model.task``, ``training.extra``) and federated evaluation; a version-1 document
#: reads as version 2 with those fields at their defaults, while a version-1 reader refuses a
#: version-2 document with "upgrade fedbucket" instead of half-understanding it.
SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = frozenset({1, 2})

#: Largest JSON document a reader accepts (bytes); manifests are a few KiB.
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024

Identifier = Annotated[str, Field(pattern=IDENTIFIER_PATTERN.pattern, max_length=63)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
#: safetensors dtype names fedbucket accepts. Floats are parameters; integers are buffers
#: (e.g. BatchNorm's ``num_batches_tracked``), aggregated by the rule in docs/protocol.md. ``U32``
#: is the ring of secure aggregation's masked inputs (docs/protocol.md, "Secure aggregation").
DType = Literal["F16", "F32", "F64", "I32", "I64", "U32"]
FLOAT_DTYPES = frozenset({"F16", "F32", "F64"})


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamps must carry a timezone (use UTC, e.g. 2026-11-25T12:00:00Z)")
    return value.astimezone(UTC)


class TensorSpec(BaseModel):
    """The dtype and shape one tensor must have."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: DType
    shape: list[Annotated[int, Field(ge=0)]]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


TensorSchema = dict[str, TensorSpec]


class Document(BaseModel):
    """Base of every protocol document."""

    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str]
    schema_version: int = SCHEMA_VERSION

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value not in SUPPORTED_SCHEMA_VERSIONS:
            raise ValueError(f"unsupported schema_version {value}")
        return value

    def to_json_bytes(self) -> bytes:
        """Canonical bytes: sorted keys, two-space indent, trailing newline. Same model, same bytes."""
        payload = {"kind": self.kind, **self.model_dump(mode="json")}
        return (json.dumps(payload, sort_keys=True, indent=2) + "\n").encode()


DocumentT = TypeVar("DocumentT", bound=Document)


def parse_document(
    cls: type[DocumentT], raw: bytes | str, *, source: str = "document", max_bytes: int = MAX_DOCUMENT_BYTES
) -> DocumentT:
    """Parse and validate one JSON document of type ``cls``.

    Raises :class:`UnsupportedSchemaVersion` when ``schema_version`` is not one this package
    reads, and :class:`SchemaError` for anything else that is wrong, naming ``source``.
    """
    if len(raw) > max_bytes:
        raise SchemaError(f"{source}: {len(raw)} bytes is larger than {max_bytes} allowed")
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise SchemaError(f"{source}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise SchemaError(f"{source}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if type(version) is not int or version not in SUPPORTED_SCHEMA_VERSIONS:  # `true == 1` in Python
        raise UnsupportedSchemaVersion(
            f"{source}: schema_version {version!r} is not supported by fedbucket "
            f"(this version reads {sorted(SUPPORTED_SCHEMA_VERSIONS)}); upgrade the fedbucket package "
            "or ask the federation operator which protocol version the bucket uses"
        )
    kind = data.pop("kind", None)
    if kind != cls.kind:
        raise SchemaError(f"{source}: expected a {cls.kind!r} document, got kind {kind!r}")
    try:
        # Strict: no coercion of untrusted input ("5" is not an int, true is not a version).
        return cls.model_validate_json(json.dumps(data), strict=True)
    except ValidationError as exc:
        raise SchemaError(f"{source}: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """pydantic's errors as one line a user can act on: ``field.path: message; ...``."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors())


TaskReference = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$", max_length=200)]
Option = int | float | str | bool
#: Free-form options (model kwargs, ``training.extra``): a few scalars with short names.
Options = Annotated[
    dict[Annotated[str, Field(max_length=64)], Option],
    Field(max_length=32),
]


class ModelSpec(BaseModel):
    """Which architecture a federation trains: a task package (``package.module:attribute``;
    ``None`` is the built-in digits task), one of the task's model names, and its kwargs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: TaskReference | None = None
    name: str = Field(min_length=1, max_length=200)
    kwargs: Options = Field(default_factory=dict)

    @field_validator("kwargs")
    @classmethod
    def _bounded_strings(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_options(value)


def _check_options(value: dict[str, Any]) -> dict[str, Any]:
    for key, option in value.items():
        if isinstance(option, str) and len(option) > 256:
            raise ValueError(f"{key}: strings may be at most 256 characters")
        if isinstance(option, float) and not math.isfinite(option):
            raise ValueError(f"{key}: numbers must be finite")
    return value


class ModelManifest(Document):
    """``models/<version>/manifest.json`` and ``rounds/<round>/candidate/manifest.json``."""

    kind: ClassVar[str] = "model-manifest"
    version: Identifier
    sha256: Sha256
    size_bytes: int = Field(ge=0)
    tensors: TensorSchema
    model: ModelSpec
    base_version: Identifier | None = None
    round_id: Identifier | None = None
    lineage: dict[str, Any] = Field(default_factory=dict)


class ModelPointer(Document):
    """``models/current.json``: the promoted global model."""

    kind: ClassVar[str] = "model-pointer"
    version: Identifier
    sha256: Sha256
    round_id: Identifier | None = None


class TrainingConfig(BaseModel):
    """Local training hyper-parameters a round asks clients to use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local_epochs: int = Field(default=1, ge=1, le=1000, description="passes over the local data per round")
    batch_size: int = Field(default=32, ge=1, le=65536, description="local mini-batch size")
    learning_rate: float = Field(default=0.05, gt=0, le=10, description="local SGD learning rate")
    proximal_mu: float = Field(
        default=0.0, ge=0, le=100, description="FedProx proximal term weight (0 = plain FedAvg local training)"
    )
    extra: Options = Field(
        default_factory=dict,
        description="the task's own hyper-parameters (at most 32 scalars), validated by its training_extra model",
    )

    @field_validator("extra")
    @classmethod
    def _bounded_strings(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_options(value)


class SecureAggregationTask(BaseModel):
    """How a round with secure aggregation runs (docs/protocol.md, "Secure aggregation"): the
    quantisation every masked input uses and the deadline of each client phase. Phase 3 (the
    masked input) ends at the round's ``deadline``."""

    model_config = ConfigDict(extra="forbid")
    clip_norm: float = Field(gt=0, description="each client clips its update to this L2 norm before quantising")
    max_clients: int = Field(ge=3, description="the ring holds the sum of this many quantised updates")
    degree: int | None = Field(default=None, ge=2, description="SecAgg+ neighbours per client; None = everyone")
    levels: int = Field(
        ge=2, description="quantisation levels: x in [-clip, clip] -> round((x + clip) / (2 clip) * levels)"
    )
    noise_stddev: float = Field(
        default=0.0,
        ge=0,
        description="distributed DP: each client adds discrete Gaussian noise of this std (ring units)",
    )
    min_survivors: int = Field(
        default=3, ge=3, description="distributed DP: the noise is sized for this many masked inputs; fewer abandon"
    )
    noise_multiplier: float | None = Field(
        default=None, gt=0, description="distributed DP: z of the summed noise (what the round is charged)"
    )
    keys_deadline: datetime = Field(description="phase 1: post secagg-keys.json by then")
    shares_deadline: datetime = Field(description="phase 2: post secagg-shares.json by then")
    unmask_deadline: datetime = Field(description="phase 4: post secagg-unmask.json by then")

    _tz = field_validator("keys_deadline", "shares_deadline", "unmask_deadline")(_utc)


class RoundTask(Document):
    """``rounds/<round>/task.json``: what a round asks of its clients."""

    kind: ClassVar[str] = "round-task"
    round_id: Identifier
    base_model_version: Identifier
    base_model_sha256: Sha256
    model: ModelSpec
    opened_at: datetime
    deadline: datetime
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    tensors: TensorSchema
    max_update_bytes: int = Field(gt=0)
    max_update_norm: float | None = Field(default=None, gt=0)
    min_clients: int = Field(default=1, ge=1)
    max_clients: int | None = Field(default=None, ge=1)
    max_examples_per_update: int | None = Field(default=None, ge=1)
    federated_evaluation: bool = Field(
        default=False, description="the round's candidate will be published for clients to score"
    )
    secure_aggregation: SecureAggregationTask | None = Field(
        default=None, description="set when the server may see only the sum of the updates"
    )

    _tz_opened = field_validator("opened_at", "deadline")(_utc)


class RoundPointer(Document):
    """``rounds/current.json``: the round clients should work on, if any."""

    kind: ClassVar[str] = "round-pointer"
    round_id: Identifier
    status: Literal["open", "closed", "evaluating"]


class UpdateManifest(Document):
    """``updates/<client>/<round>/manifest.json``: the commit marker of one client's update."""

    kind: ClassVar[str] = "update-manifest"
    client_id: Identifier
    round_id: Identifier
    base_model_version: Identifier
    num_examples: int = Field(gt=0, le=10**12)
    metrics: dict[Annotated[str, Field(max_length=64)], float] = Field(default_factory=dict, max_length=64)
    sha256: Sha256
    size_bytes: int = Field(gt=0)
    created_at: datetime

    _tz_created = field_validator("created_at")(_utc)

    @field_validator("metrics")
    @classmethod
    def _finite_metrics(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in value.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"metrics must be finite numbers; not finite: {bad}")
        return value


class UpdateVerdict(BaseModel):
    """What the server decided about one client's update."""

    model_config = ConfigDict(extra="forbid")

    client_id: str
    accepted: bool
    code: str = "accepted"
    reason: str = ""
    num_examples: int = 0
    weight: float = 0.0
    committed_at: datetime | None = None


class ClosedUpdate(BaseModel):
    """One on-time update as it stood when its round closed.

    ``committed_at`` is the later of the manifest's and the payload's commit times (store clock);
    ``payload_generation`` pins the payload bytes that were present at the close.
    """

    model_config = ConfigDict(extra="forbid")

    manifest: UpdateManifest
    committed_at: datetime
    payload_generation: int

    _tz_committed = field_validator("committed_at")(_utc)


class RoundClosing(Document):
    """``rounds/<round>/closing.json``: the updates a round closed with, frozen.

    Written once when the wait ends; aggregation reads the updates named here (payloads are
    content-addressed), so re-running a round later reproduces it byte for byte even if clients
    submit again, as long as the named payloads are still there (a changed one fails its sha256).
    """

    kind: ClassVar[str] = "round-closing"
    round_id: Identifier
    closed_at: datetime
    reason: Literal["max_clients", "quorum", "deadline", "below_quorum"]
    updates: list[ClosedUpdate] = Field(default_factory=list)
    late: list[UpdateVerdict] = Field(default_factory=list)
    ignored_objects: int = Field(default=0, ge=0, description="objects under updates/ with unsafe path ids")

    _tz_closed = field_validator("closed_at")(_utc)


class PrivacyMechanism(BaseModel):
    """DP-FedAvg with (adaptive) clipping as one round ran it (docs/privacy.md): enough to redo the
    accounting and to know how noisy the candidate is."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["gaussian", "distributed_discrete_gaussian"] = Field(
        default="gaussian",
        description="gaussian: the server adds the noise (DP-FedAvg); distributed_discrete_gaussian: each client "
        "adds discrete Gaussian noise under secure aggregation, sized for the fewest survivors (Kairouz et al. 2021)",
    )
    noise_multiplier: float = Field(gt=0, description="z: the round as one Gaussian mechanism (what is charged)")
    update_noise_multiplier: float = Field(gt=0, description="z_delta: the part of z spent on the update sum")
    clipped_count_stddev: float | None = Field(
        default=None, gt=0, description="sigma_b: noise on the unclipped count (adaptive clipping only)"
    )
    clip_norm: float = Field(gt=0, description="C: every accepted delta was scaled to L2 norm <= C")
    denominator: float = Field(gt=0, description="n-bar: the fixed number the noisy sum was divided by")
    noise_stddev: float = Field(ge=0, description="z_delta * C / n-bar: noise std of each averaged coordinate")
    target_quantile: float | None = Field(default=None, description="gamma: the norm quantile C follows")
    clip_learning_rate: float = Field(default=0.0, ge=0, description="eta: C <- C * exp(-eta * (b - gamma))")
    unclipped_fraction: float | None = Field(default=None, description="b: the noisy share of unclipped updates")
    next_clip_norm: float = Field(gt=0, description="C of the next round")
    sampling_rate: float | None = Field(
        default=None, gt=0, le=1, description="q of the server-side Poisson subsampling (None: no amplification)"
    )
    charged_clients: int = Field(ge=0, description="clients this round was charged to")


class PrivacySpent(BaseModel):
    """The federation's (epsilon, delta) after a round, from the accountant: the worst client's,
    over the rounds each client was charged for (docs/privacy.md)."""

    model_config = ConfigDict(extra="forbid")
    epsilon: float = Field(ge=0)
    delta: float = Field(gt=0, lt=1)
    accountant: str = Field(description="dp-accounting's accountant that composed the rounds")
    budget: float | None = Field(default=None, gt=0, description="the federation's epsilon budget at delta")
    rounds: int = Field(ge=0, description="differentially private rounds charged so far")
    most_rounds_per_client: int = Field(ge=0, description="the most rounds one client was charged for")
    max_participations: int | None = Field(default=None, ge=1, description="the cap on that number")


class RoundPrivacy(BaseModel):
    """What a differentially private round spent: in aggregation and round reports, in the
    candidate's lineage and in the ledger."""

    model_config = ConfigDict(extra="forbid")
    mechanism: PrivacyMechanism
    spent: PrivacySpent


class LedgerRound(BaseModel):
    """One charged round in the privacy ledger."""

    model_config = ConfigDict(extra="forbid")
    round_id: Identifier
    charged_at: datetime
    privacy: RoundPrivacy
    clients: list[Identifier] = Field(description="the clients charged (sorted)")

    _tz_charged = field_validator("charged_at")(_utc)


#: The ledger grows by one entry per round (ids of the charged clients): 64 MiB is ~3M client-rounds.
MAX_LEDGER_BYTES = 64 * 1024 * 1024


class PrivacyLedger(Document):
    """``privacy/ledger.json``: every differentially private round, in the order it was charged.
    Server-only (client ids); the accountant recomputes each client's epsilon from it, and the
    last entry's ``next_clip_norm`` is the adaptive clip norm the next round starts from."""

    kind: ClassVar[str] = "privacy-ledger"
    rounds: list[LedgerRound] = Field(default_factory=list)


class SecureAggregationSummary(BaseModel):
    """Who took part in each phase of a secure-aggregation round (the server learns no more)."""

    model_config = ConfigDict(extra="forbid")
    threshold: int = Field(ge=0)
    clip_norm: float = Field(gt=0)
    degree: int | None = None
    advertised: list[Identifier] = Field(default_factory=list, description="phase 1: posted keys (setup members)")
    shared: list[Identifier] = Field(default_factory=list, description="phase 2: shares delivered")
    masked: list[Identifier] = Field(default_factory=list, description="phase 3: masked input in the sum")
    responded: list[Identifier] = Field(default_factory=list, description="phase 4: answered the unmasking")
    dropped_after_shares: list[Identifier] = Field(
        default_factory=list, description="shared keys, sent no usable masked input: their pairwise masks were removed"
    )


class AggregationReport(Document):
    """``rounds/<round>/aggregation.json``: what the aggregation job did."""

    kind: ClassVar[str] = "aggregation-report"
    round_id: Identifier
    status: Literal["aggregated", "below_quorum"]
    base_model_version: Identifier
    strategy: str
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    min_clients: int
    candidate_sha256: Sha256 | None = None
    updates: list[UpdateVerdict] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    engine: dict[str, Any] = Field(default_factory=dict)
    message: str = ""
    privacy: RoundPrivacy | None = Field(default=None, description="set when the round was differentially private")
    secure_aggregation: SecureAggregationSummary | None = Field(
        default=None, description="set when the round used secure aggregation"
    )


class ClassMetrics(BaseModel):
    model_config = ConfigDict(extra="forbid")
    precision: float
    recall: float
    f1: float
    support: int


class ModelMetrics(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str
    loss: float
    accuracy: float
    macro_f1: float
    finite: bool
    per_class: dict[str, ClassMetrics] = Field(default_factory=dict)
    confusion: list[list[int]] | None = Field(default=None, description="rows: true class, columns: predicted")


#: Most classes a federated evaluation may have (bounds every client's report).
MAX_CLASSES = 1000
#: Scores carry a confusion matrix only up to this many classes (10,000 counts).
MAX_CONFUSION_CLASSES = 100
Count = Annotated[int, Field(ge=0, le=10**12)]


class ModelScore(BaseModel):
    """One model's score on some examples, in sums that add up across sites: summed
    cross-entropy and per-class true positives, false positives and false negatives (enough to
    recompute loss, accuracy and macro-F1 exactly)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    examples: Count
    loss_sum: float = Field(ge=0, description="summed cross-entropy over the examples whose loss was finite")
    non_finite: Count = Field(default=0, description="examples whose loss was NaN or infinite (a diverged model)")
    true_positive: list[Count] = Field(max_length=MAX_CLASSES)
    false_positive: list[Count] = Field(max_length=MAX_CLASSES)
    false_negative: list[Count] = Field(max_length=MAX_CLASSES)
    confusion: list[Annotated[list[Count], Field(max_length=MAX_CONFUSION_CLASSES)]] | None = Field(
        default=None,
        max_length=MAX_CONFUSION_CLASSES,
        description="counts by (true class, predicted class), for tasks of at most 100 classes",
    )

    @field_validator("loss_sum")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("loss_sum must be finite")
        return value


class EvaluationTask(Document):
    """``rounds/<round>/evaluation-task.json``: a round's candidate, published for clients to score
    against the round's base model on their own validation data."""

    kind: ClassVar[str] = "evaluation-task"
    round_id: Identifier
    candidate_sha256: Sha256
    base_model_version: Identifier
    base_model_sha256: Sha256
    model: ModelSpec
    num_classes: int = Field(ge=2, le=MAX_CLASSES)
    opened_at: datetime
    deadline: datetime
    max_examples_per_report: int | None = Field(default=None, ge=1)
    min_reports: int = Field(default=1, ge=1, description="reports the gate needs")
    trim_fraction: float = Field(default=0.0, ge=0, lt=0.5, description="share trimmed from each end before pooling")

    _tz = field_validator("opened_at", "deadline")(_utc)


class ClientEvaluation(Document):
    """``updates/<client>/<round>/evaluation.json``: one client's scores of the candidate and the
    round's base model on the same local validation examples. Untrusted: validated like an update."""

    kind: ClassVar[str] = "client-evaluation"
    client_id: Identifier
    round_id: Identifier
    candidate_sha256: Sha256
    base_model_version: Identifier
    candidate: ModelScore
    current: ModelScore
    created_at: datetime

    _tz = field_validator("created_at")(_utc)


class ClosedEvaluation(BaseModel):
    """A client evaluation accepted when the evaluation wait ended, with its commit time."""

    model_config = ConfigDict(extra="forbid")

    report: ClientEvaluation
    committed_at: datetime

    _tz = field_validator("committed_at")(_utc)


#: The evaluation closing holds every accepted report inline (measured: about 1 KiB per report at
#: 2 classes, 121 KiB at 1,000 classes with 6-digit counts, so ~540 such reports), so the server
#: reads it with this larger bound; it refuses to write one larger.
MAX_EVALUATION_CLOSING_BYTES = 64 * 1024 * 1024


class EvaluationClosing(Document):
    """``rounds/<round>/evaluation-closing.json``: the client evaluations a round's gate uses, frozen
    (inline) when the evaluation wait ended. At most ``MAX_EVALUATION_CLOSING_BYTES``."""

    kind: ClassVar[str] = "evaluation-closing"
    round_id: Identifier
    closed_at: datetime
    reason: Literal["max_clients", "quorum", "deadline", "below_quorum"]
    reports: list[ClosedEvaluation] = Field(default_factory=list)
    rejected: list[UpdateVerdict] = Field(default_factory=list)

    _tz = field_validator("closed_at")(_utc)


class SplitMetrics(BaseModel):
    """The candidate and the round's base model on the server's validation split (gates)."""

    model_config = ConfigDict(extra="forbid")
    examples: int
    candidate: ModelMetrics
    current: ModelMetrics


class FederatedMetrics(BaseModel):
    """The candidate and the base model scored by the clients: reports pooled after trimming."""

    model_config = ConfigDict(extra="forbid")
    reports: int = Field(description="accepted client evaluations")
    difference: float | None = Field(
        default=None,
        description="what the gate compares: the example-weighted mean, over the kept reports, of each client's "
        "candidate-minus-base difference on the gate metric (positive: better; loss counts downwards)",
    )
    metric: str = Field(default="accuracy", description="the gate metric the reports were ranked by")
    used: list[str] = Field(default_factory=list, description="clients whose scores were pooled")
    trimmed: list[str] = Field(default_factory=list, description="clients dropped as the most extreme")
    rejected: list[UpdateVerdict] = Field(default_factory=list)
    quorum: int = Field(default=1, description="reports the gate needed")
    examples: int = 0
    candidate: ModelMetrics | None = None
    current: ModelMetrics | None = None


class EvaluationReport(Document):
    """``rounds/<round>/evaluation.json``: what the gate saw. ``validation``: the server's validation
    split (gates); ``test``: the candidate on the server's test split (reported only, never
    selected on); ``federated``: the clients' pooled scores (gates)."""

    kind: ClassVar[str] = "evaluation-report"
    round_id: Identifier
    validation: SplitMetrics | None = None
    test: ModelMetrics | None = None
    federated: FederatedMetrics | None = None


class RoundReport(Document):
    """``rounds/<round>/report.json``: how a round ended."""

    kind: ClassVar[str] = "round-report"
    round_id: Identifier
    status: Literal["promoted", "rejected", "superseded", "abandoned", "failed"]
    base_model_version: Identifier
    candidate_sha256: Sha256 | None = None
    promoted_version: Identifier | None = None
    message: str = ""
    updates: list[UpdateVerdict] = Field(default_factory=list)
    ignored_objects: int = Field(default=0, ge=0)
    metrics: dict[str, Any] = Field(default_factory=dict)
    privacy: RoundPrivacy | None = Field(default=None, description="set when the round was differentially private")
    airflow: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=250)]] = Field(
        default_factory=dict, max_length=4, description="the Airflow run that wrote it: dag_id, run_id"
    )


# -- secure aggregation (docs/protocol.md, "Secure aggregation") -------------------------------

#: Base64 of binary protocol values (X25519 public keys, sealed shares, Shamir shares).
Base64 = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=512)]


class SecAggKeys(Document):
    """``updates/<client>/<round>/secagg-keys.json``, phase 1: a client's two X25519 public keys."""

    kind: ClassVar[str] = "secagg-keys"
    client_id: Identifier
    round_id: Identifier
    cipher_public: Base64
    mask_public: Base64
    seed_digest: Base64 = Field(description="SHA-256 of the self-mask seed (domain-separated)")


class SecAggMember(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: int = Field(ge=1, description="the client's Shamir x-coordinate")
    cipher_public: Base64
    mask_public: Base64
    seed_digest: Base64


class SecAggSetup(Document):
    """``rounds/<round>/secagg-setup.json``: who advertised keys, the neighbour graph, the
    threshold, and the quantisation every masked input uses. Every client reads it."""

    kind: ClassVar[str] = "secagg-setup"
    round_id: Identifier
    threshold: int = Field(ge=2)
    clip_norm: float = Field(gt=0, description="updates are clipped to this L2 norm, then quantised")
    max_clients: int = Field(ge=2, description="the ring holds the sum of this many quantised updates")
    members: dict[Identifier, SecAggMember]
    neighbours: dict[Identifier, list[Identifier]]


class SecAggShares(Document):
    """``updates/<client>/<round>/secagg-shares.json``, phase 2: sealed shares, one per neighbour."""

    kind: ClassVar[str] = "secagg-shares"
    client_id: Identifier
    round_id: Identifier
    sealed: dict[Identifier, Base64]


class SecAggInbox(Document):
    """``updates/<client>/<round>/secagg-inbox.json``, written by the server: the sealed shares
    addressed to this client, by sender (a client reads its own prefix and nothing else)."""

    kind: ClassVar[str] = "secagg-inbox"
    client_id: Identifier
    round_id: Identifier
    sealed: dict[Identifier, Base64]


class SecAggRoster(Document):
    """``rounds/<round>/secagg-shared.json`` and ``secagg-masked.json``: the clients whose shares
    were delivered (phase 2) and whose masked inputs arrived (phase 3)."""

    kind: ClassVar[str] = "secagg-roster"
    round_id: Identifier
    phase: Literal["shared", "masked"]
    clients: list[Identifier]


class SecAggUnmask(Document):
    """``updates/<client>/<round>/secagg-unmask.json``, phase 4: for each neighbour, the share of
    its self-mask seed (it survived) or of its mask key (it dropped) — never both."""

    kind: ClassVar[str] = "secagg-unmask"
    client_id: Identifier
    round_id: Identifier
    seeds: dict[Identifier, Base64] = Field(default_factory=dict)
    keys: dict[Identifier, Base64] = Field(default_factory=dict)


ALL_DOCUMENTS: tuple[type[Document], ...] = (
    ModelManifest,
    ModelPointer,
    RoundTask,
    RoundPointer,
    UpdateManifest,
    RoundClosing,
    AggregationReport,
    EvaluationTask,
    ClientEvaluation,
    EvaluationClosing,
    EvaluationReport,
    RoundReport,
    PrivacyLedger,
    SecAggKeys,
    SecAggSetup,
    SecAggShares,
    SecAggInbox,
    SecAggRoster,
    SecAggUnmask,
)


def document_class(kind: str) -> type[Document]:
    """The document model registered for ``kind``."""
    for cls in ALL_DOCUMENTS:
        if cls.kind == kind:
            return cls
    raise SchemaError(f"unknown document kind {kind!r}; known: {[c.kind for c in ALL_DOCUMENTS]}")


def utcnow() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------------------
# Reading and writing documents in a store


def read_document(
    store: ObjectStore, name: str, cls: type[DocumentT], *, max_bytes: int = MAX_DOCUMENT_BYTES
) -> tuple[DocumentT, int]:
    """Read and parse one protocol document (at most ``max_bytes`` are read: ``MAX_DOCUMENT_BYTES``
    unless the server reads a larger document it wrote itself); returns it and its generation."""
    raw, generation = store.get_bytes(name, max_bytes=max_bytes)
    return parse_document(cls, raw, source=f"{store.url}/{name}", max_bytes=max_bytes), generation


def read_optional(
    store: ObjectStore, name: str, cls: type[DocumentT], *, max_bytes: int = MAX_DOCUMENT_BYTES
) -> tuple[DocumentT | None, int]:
    """Like :func:`read_document`, but ``(None, 0)`` when the object does not exist."""
    try:
        return read_document(store, name, cls, max_bytes=max_bytes)
    except ObjectNotFound:
        return None, 0


def write_document(store: ObjectStore, name: str, doc: Document, *, if_generation_match: int | None = None) -> int:
    """Write a document in its canonical bytes; returns the new generation."""
    return store.put_bytes(name, doc.to_json_bytes(), if_generation_match=if_generation_match).generation


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
