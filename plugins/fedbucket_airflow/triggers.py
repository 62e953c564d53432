"""The trigger: waits, in the triggerer, until a round's updates (or its candidate's client
evaluations) reach their quorum or their deadline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Literal

from airflow.triggers.base import BaseTrigger, TriggerEvent

from fedbucket.protocol.documents import EvaluationTask, RoundTask, read_document, utcnow
from fedbucket.protocol.layout import LAYOUT
from fedbucket.protocol.storage import ObjectStore
from fedbucket.server.config import EvaluationSettings, RoundSettings, WaitSettings
from fedbucket.server.rounds import Survey, survey_evaluations, survey_round, wait_decision
from fedbucket.server.secagg import expected_clients, phase_deadline, read_roster_document, survey_phase
from fedbucket_airflow.hooks import FederationHook

#: What a wait waits for: updates, evaluations, or a secure-aggregation phase (keys, shares, unmask).
Phase = Literal["updates", "evaluations", "keys", "shares", "unmask"]
#: The settings model of each wait.
PHASE_SETTINGS: dict[str, type[WaitSettings]] = {
    "updates": RoundSettings,
    "evaluations": EvaluationSettings,
    "keys": WaitSettings,
    "shares": WaitSettings,
    "unmask": WaitSettings,
}


def look_at_round(
    store: ObjectStore, round_id: str, cache: dict | None = None, *, phase: Phase = "updates"
) -> tuple[datetime, Survey]:
    """The deadline of the wait and what clients sent as it stands: this round's manifests and
    payload headers, this round's client evaluations, or a secure-aggregation phase's documents."""
    if phase == "evaluations":
        evaluation_task, _ = read_document(store, LAYOUT.evaluation_task(round_id), EvaluationTask)
        return evaluation_task.deadline, survey_evaluations(store, evaluation_task, cache=cache)
    task, _ = read_document(store, LAYOUT.round_task(round_id), RoundTask)
    if phase == "updates":
        survey = survey_round(store, task, cache=cache)
        if task.secure_aggregation is not None:  # only masked inputs that can be unmasked count
            shared = set(read_roster_document(store, round_id, "shared"))
            survey.on_time = [u for u in survey.on_time if u.manifest.client_id in shared]
        return task.deadline, survey
    expected = expected_clients(store, task, phase)
    return phase_deadline(task, phase), survey_phase(store, task, phase, expected)


class RoundQuorumTrigger(BaseTrigger):
    """Polls the bucket every ``poll_seconds`` and fires once
    :func:`~fedbucket.server.rounds.wait_decision` says the wait (for ``phase``: ``updates`` or
    ``evaluations``) is over.

    Events: ``{"status": "done", "reason": ..., "on_time": n, "rejected": m}`` or
    ``{"status": "error", "message": ...}``. Updates that passed the cheap checks are remembered
    between polls (by manifest generation), so a poll costs one listing of this round plus what
    changed. Blocking storage calls run in a thread so the event loop stays free.
    """

    def __init__(
        self,
        bucket: str,
        round_id: str,
        settings: dict[str, Any],
        poll_seconds: float,
        gcp_conn_id: str | None = None,
        phase: Phase = "updates",
    ) -> None:
        super().__init__()
        self.phase = phase
        self.bucket = bucket
        self.round_id = round_id
        self.settings = settings
        self.poll_seconds = poll_seconds
        self.gcp_conn_id = gcp_conn_id

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "bucket": self.bucket,
                "round_id": self.round_id,
                "settings": self.settings,
                "poll_seconds": self.poll_seconds,
                "gcp_conn_id": self.gcp_conn_id,
                "phase": self.phase,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        settings = PHASE_SETTINGS[self.phase].model_validate(self.settings)
        cache: dict = {}
        try:
            hook = FederationHook(self.bucket, gcp_conn_id=self.gcp_conn_id)
            store = await asyncio.to_thread(lambda: hook.store)  # one client for the whole wait
            while True:
                deadline, survey = await asyncio.to_thread(look_at_round, store, self.round_id, cache, phase=self.phase)
                now = utcnow()
                reason = wait_decision(survey, now=now, deadline=deadline, settings=settings)
                on_time, rejected = len(survey.on_time), len(survey.rejected)
                if reason is not None:
                    yield TriggerEvent({"status": "done", "reason": reason, "on_time": on_time, "rejected": rejected})
                    return
                self.log.info(
                    "round %s: %d %s on time, %d rejected so far; waiting", self.round_id, on_time, self.phase, rejected
                )
                until_close = (deadline - now).total_seconds() + settings.settle_seconds
                await asyncio.sleep(max(0.2, min(self.poll_seconds, until_close + 0.1)))
        except Exception as exc:  # report, don't crash the triggerer
            yield TriggerEvent({"status": "error", "message": f"{type(exc).__name__}: {exc}"})
