"""The DAG's Params: one per run parameter, defaults from the federation config, descriptions
from the settings models' own field descriptions (one source of truth for the trigger form)."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param
from pydantic import BaseModel

from fedbucket.protocol.documents import TrainingConfig
from fedbucket.server.config import (
    RUN_PARAMETERS,
    AggregationSettings,
    FederationConfig,
    GateSettings,
    RoundSettings,
)
from fedbucket.server.strategies import STRATEGIES

_MODELS: dict[str, type[BaseModel]] = {
    "round": RoundSettings,
    "training": TrainingConfig,
    "aggregation": AggregationSettings,
    "gate": GateSettings,
}
_SECTIONS = {"round": "Round", "training": "Local training", "aggregation": "Aggregation", "gate": "Promotion gate"}
_SCHEMA: dict[str, dict[str, Any]] = {
    "deadline_seconds": {"type": "number", "exclusiveMinimum": 0},
    "min_clients": {"type": "integer", "minimum": 1},
    "max_clients": {"type": ["null", "integer"], "minimum": 1},
    "min_clients_at_deadline": {"type": ["null", "integer"], "minimum": 1},
    "grace_seconds": {"type": "number", "minimum": 0},
    "max_examples_per_update": {"type": ["null", "integer"], "minimum": 1},
    "strategy": {"type": "string", "enum": sorted(STRATEGIES)},
    "strategy_options": {"type": "object"},
    "local_epochs": {"type": "integer", "minimum": 1},
    "batch_size": {"type": "integer", "minimum": 1},
    "learning_rate": {"type": "number", "exclusiveMinimum": 0},
    "proximal_mu": {"type": "number", "minimum": 0},
    "gate_tolerance": {"type": "number", "minimum": 0},
}


def run_params(config: FederationConfig, *, max_deadline_seconds: float | None = None) -> dict[str, Param]:
    """``round_id`` plus every key of :data:`~fedbucket.server.config.RUN_PARAMETERS`, each with the
    config's value as default, its description and its section in the trigger form.
    ``max_deadline_seconds`` caps the ``deadline_seconds`` the form accepts (the wait step's limit)."""
    sections = {name: getattr(config, name) for name in _MODELS}
    params = {
        "round_id": Param(
            None,
            type=["null", "string"],
            title="Round id",
            description="Default: from the run's logical date (scheduled, backfill) or creation time (manual).",
            section="Round",
        )
    }
    for key, (section, field) in RUN_PARAMETERS.items():
        description = _MODELS[section].model_fields[field].description or ""
        schema = dict(_SCHEMA[key])
        if key == "deadline_seconds" and max_deadline_seconds is not None:
            schema["maximum"] = max_deadline_seconds - config.round.settle_seconds
        params[key] = Param(
            getattr(sections[section], field),
            title=key.replace("_", " ").capitalize(),
            description=description,
            section=_SECTIONS[section],
            **schema,
        )
    return params
