"""The DAG's Params: one per run parameter, defaults from the federation config, descriptions
from the settings models' own field descriptions (one source of truth for the trigger form)."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param
from pydantic import BaseModel

from fedbucket.protocol.documents import TrainingConfig
from fedbucket.protocol.layout import IDENTIFIER_PATTERN
from fedbucket.server.config import (
    RUN_PARAMETERS,
    AggregationSettings,
    FederationConfig,
    GateSettings,
    PrivacySettings,
    RoundSettings,
)
from fedbucket.server.strategies import STRATEGIES

_MODELS: dict[str, type[BaseModel]] = {
    "round": RoundSettings,
    "training": TrainingConfig,
    "aggregation": AggregationSettings,
    "gate": GateSettings,
    "privacy": PrivacySettings,
}
_SECTIONS = {
    "round": "Round",
    "training": "Local training",
    "aggregation": "Aggregation",
    "gate": "Promotion gate",
    "privacy": "Differential privacy",
}
#: What pydantic cannot know: the strategy names a run may choose.
_EXTRA_SCHEMA: dict[str, dict[str, Any]] = {"strategy": {"enum": sorted(STRATEGIES)}}


def _json_schema(model: type[BaseModel], field: str) -> dict[str, Any]:
    """The field's JSON schema from its pydantic model (one source for the checks), in the flat
    shape Airflow's trigger form renders: ``anyOf [X, null]`` becomes X with ``type: [t, "null"]``."""
    schema = {k: v for k, v in model.model_json_schema()["properties"][field].items() if k not in ("title", "default")}
    schema.pop("description", None)
    options = schema.pop("anyOf", None)
    if options:
        (kept,) = [o for o in options if o.get("type") != "null"]
        schema |= {**kept, "type": [kept["type"], "null"]}
    return schema


def run_params(config: FederationConfig, *, max_deadline_seconds: float | None = None) -> dict[str, Param]:
    """``round_id`` plus every key of :data:`~fedbucket.server.config.RUN_PARAMETERS`, each with the
    config's value as default, its description and its section in the trigger form.
    ``max_deadline_seconds`` caps the ``deadline_seconds`` the form accepts (the wait step's limit)."""
    sections = {name: getattr(config, name) for name in _MODELS}
    params = {
        "round_id": Param(
            None,
            type=["null", "string"],
            pattern=IDENTIFIER_PATTERN.pattern,
            title="Round id",
            description="Default: from the run's logical date (scheduled, backfill) or creation time (manual).",
            section="Round",
        )
    }
    for key, (section, field) in RUN_PARAMETERS.items():
        description = _MODELS[section].model_fields[field].description or ""
        schema = _json_schema(_MODELS[section], field) | _EXTRA_SCHEMA.get(key, {})
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
