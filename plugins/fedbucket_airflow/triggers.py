"""The trigger: waits, in the triggerer, until a round reaches its quorum or its deadline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from fedbucket.config import RoundSettings
from fedbucket.federation import collect_round_updates, read_document
from fedbucket.layout import LAYOUT
from fedbucket.schemas import RoundTask, utcnow
from fedbucket.storage import cached_store
from fedbucket_airflow.rounds import wait_decision


def count_updates(bucket: str, round_id: str) -> tuple[RoundTask, int, int]:
    """``(task, on_time, late)`` for the round as it stands (manifests only; cheap)."""
    store = cached_store(bucket)  # one client for the triggerer's lifetime, not one per poll
    task, _ = read_document(store, LAYOUT.round_task(round_id), RoundTask)
    on_time, late = collect_round_updates(store, task)
    return task, len(on_time), len(late)


class RoundQuorumTrigger(BaseTrigger):
    """Polls the bucket every ``poll_seconds`` and fires once :func:`wait_decision` says so.

    Events: ``{"status": "done", "reason": ..., "on_time": n, "late": m}`` or
    ``{"status": "error", "message": ...}``. ``quorum_reached_at`` (ISO time) carries the start of
    the grace period over from the sensor's first look. Blocking storage calls run in a thread so the
    triggerer's event loop stays free for other triggers.
    """

    def __init__(
        self, bucket: str, round_id: str, settings: dict[str, Any], quorum_reached_at: str | None = None
    ) -> None:
        super().__init__()
        self.bucket = bucket
        self.round_id = round_id
        self.settings = settings
        self.quorum_reached_at = quorum_reached_at

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "bucket": self.bucket,
                "round_id": self.round_id,
                "settings": self.settings,
                "quorum_reached_at": self.quorum_reached_at,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        settings = RoundSettings.model_validate(self.settings)
        reached = datetime.fromisoformat(self.quorum_reached_at) if self.quorum_reached_at else None
        try:
            while True:
                task, on_time, late = await asyncio.to_thread(count_updates, self.bucket, self.round_id)
                now = utcnow()
                if reached is None and on_time >= settings.min_clients:
                    reached = now
                    self.log.info("round %s reached its quorum of %d", self.round_id, settings.min_clients)
                reason = wait_decision(
                    on_time=on_time, now=now, deadline=task.deadline, quorum_reached_at=reached, settings=settings
                )
                if reason is not None:
                    yield TriggerEvent({"status": "done", "reason": reason, "on_time": on_time, "late": late})
                    return
                self.log.info("round %s: %d on time, %d late; waiting", self.round_id, on_time, late)
                until_close = (task.deadline - now).total_seconds() + settings.settle_seconds
                await asyncio.sleep(max(0.2, min(settings.poll_seconds, until_close + 0.1)))
        except Exception as exc:  # report, don't crash the triggerer
            yield TriggerEvent({"status": "error", "message": f"{type(exc).__name__}: {exc}"})
