"""The trigger: waits, in the triggerer, until a round reaches its quorum or its deadline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from fedbucket.protocol.documents import RoundTask, read_document, utcnow
from fedbucket.protocol.layout import LAYOUT
from fedbucket.protocol.storage import ObjectStore
from fedbucket.server.config import RoundSettings
from fedbucket.server.rounds import PrecheckCache, RoundSurvey, survey_round, wait_decision
from fedbucket_airflow.hooks import FederationHook


def look_at_round(
    store: ObjectStore, round_id: str, cache: PrecheckCache | None = None
) -> tuple[RoundTask, RoundSurvey]:
    """The round's task and its updates as they stand (this round's manifests and payload headers only)."""
    task, _ = read_document(store, LAYOUT.round_task(round_id), RoundTask)
    return task, survey_round(store, task, cache=cache)


class RoundQuorumTrigger(BaseTrigger):
    """Polls the bucket every ``poll_seconds`` and fires once
    :func:`~fedbucket.server.rounds.wait_decision` says the wait is over.

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
    ) -> None:
        super().__init__()
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
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        settings = RoundSettings.model_validate(self.settings)
        cache: PrecheckCache = {}
        try:
            hook = FederationHook(self.bucket, gcp_conn_id=self.gcp_conn_id)
            store = await asyncio.to_thread(lambda: hook.store)  # one client for the whole wait
            while True:
                task, survey = await asyncio.to_thread(look_at_round, store, self.round_id, cache)
                now = utcnow()
                reason = wait_decision(survey, now=now, deadline=task.deadline, settings=settings)
                on_time, rejected = len(survey.on_time), len(survey.rejected)
                if reason is not None:
                    yield TriggerEvent({"status": "done", "reason": reason, "on_time": on_time, "rejected": rejected})
                    return
                self.log.info("round %s: %d on time, %d rejected so far; waiting", self.round_id, on_time, rejected)
                until_close = (task.deadline - now).total_seconds() + settings.settle_seconds
                await asyncio.sleep(max(0.2, min(self.poll_seconds, until_close + 0.1)))
        except Exception as exc:  # report, don't crash the triggerer
            yield TriggerEvent({"status": "error", "message": f"{type(exc).__name__}: {exc}"})
