"""A federation's settings: one TOML file read by ``fedbucket init``, the DAG and the jobs.

Example (``dags/federation.toml`` is a complete one)::

    bucket = "file:///tmp/fedbucket-demo"
    model = { name = "mlp", kwargs = { hidden = 64 } }

    [round]
    deadline_seconds = 120
    min_clients = 3

    [aggregation]
    strategy = "fedavg"

Every field has a default except ``bucket``; unknown keys are errors (a typo must not silently
fall back to a default).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedbucket.protocol.documents import Identifier, ModelSpec, TrainingConfig, describe_validation_error
from fedbucket.protocol.errors import ConfigError
from fedbucket.protocol.secagg import minimum_threshold


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WaitSettings(_Section):
    """When a wait for clients ends: for updates (``[round]``) or for evaluations (``[evaluation]``)."""

    deadline_seconds: float = Field(default=600.0, gt=0, description="how long clients have to submit")
    min_clients: int = Field(default=2, ge=1, description="quorum: stop waiting (after the grace period) once reached")
    max_clients: int | None = Field(default=None, ge=1, description="stop waiting at once when this many arrived")
    grace_seconds: float = Field(default=0.0, ge=0, description="after the quorum, wait this long for more")
    grace_after: Literal["quorum", "last"] = Field(
        default="quorum",
        description="count the grace from the arrival that made the quorum, or from the latest arrival "
        "(the wait goes on while answers keep coming: secure aggregation's later phases)",
    )
    min_clients_at_deadline: int | None = Field(
        default=None, ge=1, description="at the deadline, go on if this many arrived (default: min_clients)"
    )
    settle_seconds: float = Field(
        default=5.0, ge=0, description="at the deadline, wait this long before closing so in-flight uploads are seen"
    )
    poll_seconds: float = Field(default=5.0, gt=0, description="how often the wait step looks at the bucket")

    @model_validator(mode="after")
    def _consistent(self) -> WaitSettings:
        if self.max_clients is not None and self.max_clients < self.min_clients:
            raise ValueError("max_clients must be at least min_clients")
        if self.min_clients_at_deadline is not None and self.min_clients_at_deadline > self.min_clients:
            raise ValueError("min_clients_at_deadline must be at most min_clients")
        return self

    @property
    def quorum_at_deadline(self) -> int:
        return self.min_clients_at_deadline or self.min_clients


class RoundSettings(WaitSettings):
    """When a round stops waiting for updates, and the bounds on an update."""

    max_update_norm: float | None = Field(default=None, gt=0, description="reject updates with a larger L2 norm")
    max_examples_per_update: int | None = Field(
        default=None,
        ge=1,
        description="cap on the example count one update may claim (larger claims are clamped to it and the "
        "report says so); None trusts clients' counts, so one client could take nearly all the FedAvg weight",
    )


class EvaluationSettings(WaitSettings):
    """Federated evaluation: clients score the candidate on their own validation data
    (docs/aggregation.md, "Federated evaluation"). Used when ``gate.source`` is ``federated`` or
    ``both``: the candidate is published for scoring and a second wait collects the scores."""

    deadline_seconds: float = Field(default=300.0, gt=0, description="how long clients have to score the candidate")
    min_clients: int = Field(
        default=3,
        ge=1,
        description="stop waiting (after the grace period) once this many reports arrived; with "
        "min_clients_at_deadline, the reports the gate needs (fewer: the candidate is rejected)",
    )
    trim_fraction: float = Field(
        default=0.1,
        ge=0,
        lt=0.5,
        description="drop this share (rounded up, keeping at least one) of the reports with the highest and of "
        "those with the lowest candidate-minus-current difference on the gate metric before pooling",
    )
    max_examples_per_report: int | None = Field(
        default=100_000, ge=1, description="a report claiming more examples is rejected (bounds its weight)"
    )

    @model_validator(mode="after")
    def _trimming_possible(self) -> EvaluationSettings:
        if self.trim_fraction > 0 and self.quorum_at_deadline < 3:
            raise ValueError(
                "trimming one report from each end needs at least 3 reports: raise min_clients (and "
                "min_clients_at_deadline) to 3, or set trim_fraction = 0 and accept that one client can decide the gate"
            )
        return self


class AggregationSettings(_Section):
    strategy: str = Field(default="fedavg", description="aggregation strategy (docs/aggregation.md)")
    options: dict[str, Any] = Field(default_factory=dict, description='the strategy\'s options, e.g. {"clip_norm": 5}')
    engine: Literal["local", "dataproc"] = "local"
    spark_master: str = "local[*]"
    spark_driver_memory: str = Field(
        default="2g", pattern=r"^[0-9]+[mg]$", description="driver heap; 2g holds a DistilBERT-sized candidate"
    )
    spark_submit: str | None = Field(default=None, description="spark-submit to run (default: next to Python)")
    spark_class_data_cache: str | None = Field(
        default="~/.cache/fedbucket/spark-cds",
        description="local engine: a directory for the spark-submit JVM's class-data-sharing archive (the first "
        "job writes it, later ones start ~3 s faster); empty or null: none",
    )


class DataprocSettings(_Section):
    """Where the Spark jobs run when ``aggregation.engine = "dataproc"`` (see docs/deploy.md)."""

    project_id: str = Field(min_length=6, max_length=30)
    region: str = Field(min_length=3)
    cluster_config: str = Field(
        default="dataproc_cluster.json",
        description="cluster config JSON written from Terraform's output, relative to this config file",
    )
    artifacts_root: str = Field(
        pattern=r"^gs://[^/]+/.+[^/]$", description="gs://<artifacts bucket>/fedbucket/<version>: code the cluster runs"
    )
    labels: dict[str, str] = Field(default_factory=dict)


class GateSettings(_Section):
    """When a candidate may replace the current model."""

    metric: Literal["accuracy", "macro_f1", "loss"] = Field(default="accuracy", description="metric the gate compares")
    source: Literal["holdout", "federated", "both"] = Field(
        default="holdout",
        description="where the gate's figures come from: the server's validation split, the clients' federated "
        "evaluation, or both (the candidate must pass each)",
    )
    tolerance: float = Field(
        default=0.0, ge=0, description="how much worse than the current model the candidate may be on the gate metric"
    )


class PrivacySettings(_Section):
    """Central (user-level) differential privacy: DP-FedAvg with adaptive clipping (docs/privacy.md).

    Each accepted delta is clipped to the round's norm C, the clipped deltas are summed with equal
    weights, Gaussian noise of std ``z_delta * C`` is added and the sum is divided by the fixed
    ``expected_clients``. With ``adaptive_clipping``, C follows that quantile of the update norms
    (Andrew et al. 2021); the unclipped count gets its own noise and the two noises together form one
    Gaussian mechanism with multiplier ``noise_multiplier``, which is what the accountant charges.
    """

    dp: bool = Field(default=False, description="make every round's candidate differentially private")
    noise_multiplier: float = Field(default=1.0, gt=0, description="z: noise std / sensitivity of one round")
    clip_norm: float = Field(
        default=0.1, gt=0, description="C of the first round (of every round without adaptive_clipping)"
    )
    adaptive_clipping: bool = Field(default=True, description="C follows target_quantile of the update norms")
    target_quantile: float = Field(
        default=0.5, gt=0, lt=1, description="gamma: the share of updates C should leave unclipped"
    )
    clip_learning_rate: float = Field(default=0.2, gt=0, description="eta of the geometric clip-norm update")
    clipped_count_stddev: float | None = Field(
        default=None, gt=0, description="sigma_b of the unclipped-count noise (default: expected_clients / 20)"
    )
    expected_clients: int | None = Field(
        default=None, ge=1, description="n-bar, the fixed denominator (default: the round's min_clients)"
    )
    max_participations: int = Field(
        default=10, ge=1, description="a client's updates are refused after it was charged for this many rounds"
    )
    epsilon_budget: float = Field(default=8.0, gt=0, description="the publish step opens no round past this epsilon")
    delta: float = Field(default=1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) guarantee")
    sampling_rate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="server-side Poisson subsampling of the received updates (secret, before reading them): "
        "claims amplification against observers of released models only (docs/privacy.md)",
    )
    key_secret: str | None = Field(
        default=None,
        pattern=r"^projects/[^/]+/secrets/[^/]+/versions/[^/]+$",
        description="Secret Manager version holding the hex noise key, read by the aggregation job when "
        "FEDBUCKET_DP_KEY is not set (Dataproc: terraform output dp_key_secret)",
    )
    key_connection: str = Field(
        default="fedbucket_dp_key",
        description="Airflow connection whose password is the hex noise key (else the FEDBUCKET_DP_KEY variable)",
    )

    @model_validator(mode="after")
    def _noise_split_possible(self) -> PrivacySettings:
        stddev = self.clipped_count_stddev
        if self.adaptive_clipping and stddev is not None and 2 * stddev <= self.noise_multiplier:
            raise ValueError(
                f"clipped_count_stddev {stddev:g} leaves no noise for the updates: the "
                f"count's share of z={self.noise_multiplier:g} needs 2 * clipped_count_stddev > z"
            )
        return self

    def denominator(self, min_clients: int) -> int:
        return self.expected_clients or min_clients


class SecureAggregationSettings(_Section):
    """Secure aggregation (SecAgg / SecAgg+; docs/privacy.md): the server learns only the sum of
    the masked updates of the clients that finished. Clients clip their update to ``clip_norm`` and
    quantise it into uint32; updates count equally (the server cannot weight what it cannot see).

    Timeline of a round: clients train and post keys until the round's ``deadline_seconds`` (phase
    1), then each later phase gets ``phase_seconds`` (shares, masked input, unmasking); every phase
    ends early once everyone expected has answered, or ``grace_seconds`` after the quorum."""

    enabled: bool = Field(default=False, description="run every round with secure aggregation")
    clip_norm: float = Field(default=1.0, gt=0, description="each client clips its update to this L2 norm")
    degree: int | None = Field(
        default=None,
        ge=2,
        description="SecAgg+: neighbours per client (even); None = every client up to 32, else 2 ceil(log2 n)",
    )
    threshold: int | None = Field(
        default=None, ge=2, description="shares that rebuild a secret: a floor, raised to a strict majority of holders"
    )
    phase_seconds: float = Field(default=120.0, gt=0, description="deadline of each phase after the first")
    grace_seconds: float = Field(default=2.0, ge=0, description="after a phase's quorum, wait this long for more")

    @model_validator(mode="after")
    def _graph_possible(self) -> SecureAggregationSettings:
        if self.degree is not None and self.degree % 2:
            raise ValueError(f"degree must be even (a circulant graph has an even degree), got {self.degree}")
        if (
            self.degree is not None
            and self.threshold is not None
            and not minimum_threshold(self.degree) <= self.threshold <= self.degree
        ):
            raise ValueError(
                f"threshold {self.threshold} with degree {self.degree}: it must be between "
                f"{minimum_threshold(self.degree)} (a strict majority of a client's share holders) and the degree"
            )
        return self


class FederationConfig(_Section):
    bucket: str = Field(min_length=1, description="federation root URL: gs://bucket/prefix or file:///dir")
    model: ModelSpec = ModelSpec(name="mlp", kwargs={"hidden": 64})
    seed: int = 0
    schedule: str | None = Field(default=None, description="cron or preset (e.g. '@hourly'); None = manual rounds")
    round: RoundSettings = RoundSettings()
    training: TrainingConfig = TrainingConfig()
    aggregation: AggregationSettings = AggregationSettings()
    gate: GateSettings = GateSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    privacy: PrivacySettings = PrivacySettings()
    secure_aggregation: SecureAggregationSettings = SecureAggregationSettings()
    dataproc: DataprocSettings | None = None
    holdout_fraction: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="share of the task's example data `fedbucket init` keeps as validation "
        "and test splits (half each) when no split files are given",
    )
    retries: int = Field(default=2, ge=0, description="Airflow retries of each round step")
    retry_delay_seconds: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _engine_settings(self) -> FederationConfig:
        if self.aggregation.engine == "dataproc" and self.dataproc is None:
            raise ValueError('aggregation.engine = "dataproc" needs a [dataproc] section')
        if self.aggregation.engine == "dataproc" and self.privacy.dp and self.privacy.key_secret is None:
            raise ValueError(
                "dp on Dataproc needs [privacy] key_secret: the Secret Manager version of the noise key "
                "(terraform output dp_key_secret); the job cannot get it any other way without exposing it"
            )
        if self.secure_aggregation.enabled and self.round.quorum_at_deadline < 3:
            raise ValueError(
                "secure aggregation needs [round] min_clients and min_clients_at_deadline of at least 3 (a sum of "
                "two reveals each to the other's owner)"
            )
        if self.secure_aggregation.enabled and self.round.max_clients is None:
            raise ValueError(
                "secure aggregation needs [round] max_clients: the quantisation ring is sized so that the sum of "
                "that many updates cannot wrap"
            )
        return self

    @classmethod
    def load(cls, path: str | Path) -> FederationConfig:
        """Read and validate a TOML config; :class:`SchemaError` names the file and the field."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{path}: {describe_validation_error(exc)}") from None
        check_aggregation(config.aggregation, config.privacy, config.secure_aggregation)  # names the option
        return config


#: Settings a manual run may override (Airflow Params / ``--conf`` keys) -> where they live.
RUN_PARAMETERS: dict[str, tuple[str, str]] = {
    "deadline_seconds": ("round", "deadline_seconds"),
    "min_clients": ("round", "min_clients"),
    "max_clients": ("round", "max_clients"),
    "min_clients_at_deadline": ("round", "min_clients_at_deadline"),
    "grace_seconds": ("round", "grace_seconds"),
    "max_examples_per_update": ("round", "max_examples_per_update"),
    "strategy": ("aggregation", "strategy"),
    "strategy_options": ("aggregation", "options"),
    "local_epochs": ("training", "local_epochs"),
    "batch_size": ("training", "batch_size"),
    "learning_rate": ("training", "learning_rate"),
    "proximal_mu": ("training", "proximal_mu"),
    "gate_tolerance": ("gate", "tolerance"),
    "dp": ("privacy", "dp"),
    "noise_multiplier": ("privacy", "noise_multiplier"),
}


class RunSettings(_Section):
    """Everything one round run uses: resolved once by the publish step from the config and the
    run's parameters, passed to every later step as one JSON document (the publish step's XCom)
    and parsed there with this model. The wait, the Spark jobs and the report never re-read Params.
    """

    round_id: Identifier
    bucket: str
    round: RoundSettings
    training: TrainingConfig
    aggregation: AggregationSettings
    gate: GateSettings
    evaluation: EvaluationSettings
    privacy: PrivacySettings = PrivacySettings()
    secure_aggregation: SecureAggregationSettings = SecureAggregationSettings()
    aggregation_quorum: int = Field(
        ge=1, description="valid updates aggregation needs: the quorum that still closes a round at its deadline"
    )

    @model_validator(mode="after")
    def _quorum_follows_round(self) -> RunSettings:
        if self.aggregation_quorum != self.round.quorum_at_deadline:
            raise ValueError("aggregation_quorum must equal the round's quorum at the deadline")
        return self

    @classmethod
    def resolve(cls, config: FederationConfig, round_id: str, overrides: dict[str, Any]) -> RunSettings:
        """The config overridden by a run's parameters (``None`` keeps the config's value).

        Raises :class:`ConfigError` for an unknown parameter (a typo must not fall back to a
        default), an invalid value, or strategy options the strategy does not take.
        """
        unknown = sorted(set(overrides) - set(RUN_PARAMETERS) - {"round_id"})
        if unknown:
            raise ConfigError(f"unknown run parameter(s) {unknown}; known: {sorted(RUN_PARAMETERS)}")
        sections: dict[str, dict[str, Any]] = {
            "round": config.round.model_dump(),
            "training": config.training.model_dump(),
            "aggregation": config.aggregation.model_dump(),
            "gate": config.gate.model_dump(),
            "evaluation": config.evaluation.model_dump(),
            "privacy": config.privacy.model_dump(),
            "secure_aggregation": config.secure_aggregation.model_dump(),
        }
        for key, value in overrides.items():
            if key in RUN_PARAMETERS and value is not None:
                section, field = RUN_PARAMETERS[key]
                sections[section][field] = value
        try:
            round_settings = RoundSettings.model_validate(sections["round"])
            settings = cls.model_validate(
                {
                    "round_id": round_id,
                    "bucket": config.bucket,
                    **sections,
                    "aggregation_quorum": round_settings.quorum_at_deadline,
                }
            )
        except ValidationError as exc:
            raise ConfigError(f"run parameters: {describe_validation_error(exc)}") from None
        check_aggregation(settings.aggregation, settings.privacy, settings.secure_aggregation)
        return settings

    @property
    def federated_evaluation(self) -> bool:
        """Whether this round's gate asks clients to score the candidate."""
        return self.gate.source in ("federated", "both")


def check_aggregation(
    aggregation: AggregationSettings,
    privacy: PrivacySettings,
    secure: SecureAggregationSettings | None = None,
) -> None:
    """Raise :class:`ConfigError` unless the strategy takes its options and can run with the
    privacy settings: DP-FedAvg needs a mean-based strategy (the Gaussian noise is calibrated to the
    sensitivity of a sum) and does its own clipping; secure aggregation releases only a sum, so
    nothing that needs one client's update (a median, a trimmed mean, a server-side norm) can run."""
    from fedbucket.server.strategies import build_strategy

    strategy = build_strategy(aggregation.strategy, aggregation.options)
    if secure is not None and secure.enabled:
        if strategy.needs_all_deltas:
            raise ConfigError(
                f"strategy {strategy.name!r} cannot run with secure aggregation: it needs every client's update, "
                "and the server sees only their sum; use fedavg or a server optimiser (fedavgm, fedadam, fedyogi, "
                "fedadagrad)"
            )
        if strategy.clip_norm is not None:
            raise ConfigError(
                "with secure aggregation the server cannot see an update's norm: clients clip to "
                "[secure_aggregation] clip_norm themselves; remove the strategy's clip_norm option"
            )
        if privacy.dp and privacy.adaptive_clipping:
            raise ConfigError(
                "dp with secure aggregation is distributed DP: clients clip to [secure_aggregation] clip_norm and "
                "add the noise, and the server never sees the norms adaptive clipping needs; set [privacy] "
                "adaptive_clipping = false"
            )
        if privacy.dp and privacy.sampling_rate is not None:
            raise ConfigError(
                "server-side sampling cannot amplify under secure aggregation: who is in the sum is public (the "
                "rosters); remove [privacy] sampling_rate"
            )
    if not privacy.dp:
        return
    if strategy.needs_all_deltas:
        raise ConfigError(
            f"strategy {strategy.name!r} cannot run with dp: the Gaussian noise is calibrated to the sensitivity of "
            "a clipped sum, and no sensitivity of a coordinate-wise median or trimmed mean is stated here; use "
            "fedavg or a server optimiser (fedavgm, fedadam, fedyogi, fedadagrad)"
        )
    if strategy.clip_norm is not None:
        raise ConfigError(
            "dp clips every update itself ([privacy] clip_norm, adaptive_clipping): remove the "
            "strategy's clip_norm option"
        )


def check_task(model: ModelSpec, training: TrainingConfig) -> None:
    """Import ``model``'s task and check the model name and ``training.extra`` against it
    (:class:`ConfigError` says what is wrong and where the task must be importable). Imports
    torch: called by ``init`` and the publish step, never at DAG parse time."""
    from fedbucket.torch.task import load_task

    task = load_task(model.task)
    if model.name not in task.models:
        raise ConfigError(f"task {task.name!r} has no model {model.name!r}; it has {sorted(task.models)}")
    task.check_training(training)
