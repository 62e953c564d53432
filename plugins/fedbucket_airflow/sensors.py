"""The sensor: the round's wait step, deferrable."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, Context
from airflow.sdk.exceptions import AirflowException, AirflowSkipException

from fedbucket.config import RoundSettings
from fedbucket.federation import freeze_round, read_document
from fedbucket.layout import LAYOUT
from fedbucket.schemas import RoundTask, utcnow
from fedbucket_airflow.hooks import FederationHook
from fedbucket_airflow.rounds import wait_decision
from fedbucket_airflow.triggers import RoundQuorumTrigger, count_updates


class RoundQuorumSensor(BaseSensorOperator):
    """Wait until round ``round_id`` has its quorum (or its deadline passes), then freeze it.

    Pokes once; if the round is not done yet it defers to :class:`RoundQuorumTrigger`, freeing
    its worker slot. When the wait ends it writes ``rounds/<round>/closing.json`` (the on-time
    updates, frozen, and the late ones) and closes the round. Below the quorum at the deadline
    the task is skipped: downstream aggregation is skipped too and the report marks the round
    *abandoned*, leaving the current model untouched.

    :param bucket: federation URL.
    :param round_id: the round (templated).
    :param settings: the round's effective settings from the publish step (templated); the wait
        reads its ``"round"`` part (``fedbucket.config.RoundSettings``).
    """

    template_fields: Sequence[str] = ("round_id", "settings")

    def __init__(self, *, bucket: str, round_id: str, settings: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bucket = bucket
        self.round_id = round_id
        self.settings = settings

    def execute(self, context: Context) -> dict[str, Any]:
        settings = RoundSettings.model_validate(self.settings["round"])
        if FederationHook(self.bucket).store.exists(LAYOUT.round_closing(self.round_id)):
            self.log.info("round %s was closed by an earlier run: using its frozen updates", self.round_id)
            return self._finish("deadline", 0, 0)
        task, on_time, late = count_updates(self.bucket, self.round_id)
        now = utcnow()
        reason = wait_decision(
            on_time=on_time,
            now=now,
            deadline=task.deadline,
            quorum_reached_at=now if on_time >= settings.min_clients else None,
            settings=settings,
        )
        if reason is not None:
            return self._finish(reason, on_time, late)
        self.log.info(
            "round %s: %d update(s) on time, %d late; deferring until %d arrive or %s",
            self.round_id, on_time, late, settings.min_clients, task.deadline.isoformat(),
        )  # fmt: skip
        reached = now.isoformat() if on_time >= settings.min_clients else None
        close_by = task.deadline + timedelta(seconds=settings.settle_seconds)
        self.defer(
            trigger=RoundQuorumTrigger(
                bucket=self.bucket, round_id=self.round_id, settings=self.settings["round"], quorum_reached_at=reached
            ),
            method_name="execute_complete",
            # the trigger fires by the deadline at the latest; this only catches a stuck triggerer
            timeout=max(timedelta(0), close_by - now) + timedelta(minutes=30),
        )
        raise AssertionError("defer() returns only by raising")  # pragma: no cover

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("status") != "done":
            raise AirflowException(f"waiting for round {self.round_id} failed: {event.get('message')}")
        return self._finish(event["reason"], event["on_time"], event["late"])

    def _finish(self, reason: str, on_time: int, late: int) -> dict[str, Any]:
        store = FederationHook(self.bucket).store
        task, _ = read_document(store, LAYOUT.round_task(self.round_id), RoundTask)
        closing = freeze_round(store, task, reason=reason, closed_at=utcnow())
        self.log.info(
            "round %s closed (%s): %d update(s) frozen for aggregation, %d late or unreadable",
            self.round_id, closing.reason, len(closing.updates), len(closing.late),
        )  # fmt: skip
        if closing.reason == "below_quorum":
            raise AirflowSkipException(
                f"round {self.round_id} abandoned: {len(closing.updates)} update(s) by the deadline, "
                f"fewer than {RoundSettings.model_validate(self.settings['round']).quorum_at_deadline}"
            )
        return {"reason": closing.reason, "updates": len(closing.updates), "late": len(closing.late)}
