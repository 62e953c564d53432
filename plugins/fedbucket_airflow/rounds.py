"""Round logic shared by the operators, the sensor and the trigger."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from fedbucket.config import FederationConfig, RoundSettings
from fedbucket.layout import check_identifier

ROUND_ID_FORMAT = "%Y%m%dT%H%M%SZ"


def round_id_for(logical_date: datetime | None, run_after: datetime, requested: str | None = None) -> str:
    """The round id of a DAG run.

    ``requested`` (the ``round_id`` param of a manual trigger) wins. Otherwise scheduled and
    backfill runs use their logical date (deterministic: a backfill or a clear of the same date
    is the same round), and manual runs (no logical date) the run's ``run_after`` time, fixed when
    the run was created, so a clear-and-rerun of a manual run is the same round too.
    """
    if requested:
        return check_identifier(str(requested), "round id")
    moment = logical_date if logical_date is not None else run_after
    return moment.strftime(ROUND_ID_FORMAT)


def effective_settings(config: FederationConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The round's settings: the config's, overridden by the run's (validated) params."""

    def pick(name: str, default: Any) -> Any:
        value = params.get(name)
        return default if value is None else value

    round_settings = config.round.model_copy(
        update={
            key: params[key]
            for key in ("deadline_seconds", "min_clients", "max_clients", "grace_seconds", "min_clients_at_deadline")
            if params.get(key) is not None
        }
    )
    round_settings = RoundSettings.model_validate(round_settings.model_dump())  # re-check cross-field rules
    training = config.training.model_copy(
        update={
            k: params[k]
            for k in ("local_epochs", "batch_size", "learning_rate", "proximal_mu")
            if params.get(k) is not None
        }
    )
    return {
        "bucket": config.bucket,
        "round": round_settings.model_dump(),
        "training": training.model_dump(),
        # valid updates aggregation needs: the smaller quorum that still closes a round at its deadline
        "aggregation_quorum": round_settings.quorum_at_deadline,
        "strategy": pick("strategy", config.aggregation.strategy),
        "strategy_options": pick("strategy_options", config.aggregation.options),
        "gate": {"metric": config.gate.metric, "tolerance": pick("gate_tolerance", config.gate.tolerance)},
    }


def wait_decision(
    *,
    on_time: int,
    now: datetime,
    deadline: datetime,
    quorum_reached_at: datetime | None,
    settings: RoundSettings,
) -> str | None:
    """Why the wait for updates ends now, or ``None`` to keep waiting.

    ``max_clients``: that many on-time updates arrived. ``quorum``: ``min_clients`` arrived and
    the grace period since then has passed. ``deadline``: the deadline (plus ``settle_seconds``,
    so that updates still in flight are seen and recorded as late) passed with at least
    ``min_clients_at_deadline`` on time. ``below_quorum``: it passed with fewer (the round is
    abandoned).
    """
    if settings.max_clients is not None and on_time >= settings.max_clients:
        return "max_clients"
    if (
        on_time >= settings.min_clients
        and quorum_reached_at is not None
        and now - quorum_reached_at >= timedelta(seconds=settings.grace_seconds)
    ):
        return "quorum"
    if now >= deadline + timedelta(seconds=settings.settle_seconds):
        return "deadline" if on_time >= settings.quorum_at_deadline else "below_quorum"
    return None
