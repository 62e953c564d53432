"""The sensor: a round's wait steps — for updates, and for the clients' evaluations of the
candidate — a real sensor (``poke``), deferrable by default."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import Any

from airflow.sdk import BaseSensorOperator, Context, PokeReturnValue
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from fedbucket.protocol.documents import (
    MAX_EVALUATION_CLOSING_BYTES,
    EvaluationClosing,
    EvaluationTask,
    RoundClosing,
    RoundTask,
    read_document,
    read_optional,
    utcnow,
)
from fedbucket.protocol.layout import LAYOUT
from fedbucket.protocol.storage import ObjectStore
from fedbucket.server import privacy, secagg
from fedbucket.server.config import RunSettings, WaitSettings
from fedbucket.server.rounds import freeze_evaluations, freeze_round, wait_decision
from fedbucket_airflow.hooks import FederationHook
from fedbucket_airflow.triggers import Phase, RoundQuorumTrigger, look_at_round


class RoundQuorumSensor(BaseSensorOperator):
    """Wait until the round has its quorum (or its deadline passes), then freeze it.

    ``phase="updates"`` (the default) waits for model updates; ``phase="evaluations"`` waits for
    the clients' scores of the round's candidate (``[evaluation]`` settings) and freezes them in
    ``rounds/<round>/evaluation-closing.json``. Below its quorum an evaluation wait still
    succeeds: the gate then refuses the candidate for lack of figures, and the report says so.

    :meth:`poke` looks at the bucket once (this round's manifests and the payloads' headers: an
    update counts toward the quorum only if it passes those cheap checks) and applies
    :func:`~fedbucket.server.rounds.wait_decision`. With ``deferrable=True`` (the default) the
    sensor pokes once and then defers to :class:`RoundQuorumTrigger`, which polls every
    ``poke_interval`` seconds without holding a worker slot, within the sensor's ``timeout``;
    with ``deferrable=False`` the base class's poke loop runs (``mode="poke"`` or ``"reschedule"``).

    When the wait ends it writes ``rounds/<round>/closing.json`` (the updates that passed, with
    their payload generations pinned, and the rejected ones) and closes the round. Below the
    quorum at the deadline the task is skipped, so aggregation is skipped and the report marks
    the round *abandoned*.

    :param settings: the run's settings from the publish step (templated; a
        :class:`~fedbucket.server.config.RunSettings` as JSON).
    :param gcp_conn_id: see :class:`~fedbucket_airflow.hooks.FederationHook`.
    """

    template_fields: Sequence[str] = ("settings",)

    def __init__(
        self,
        *,
        settings: dict[str, Any] | str,
        deferrable: bool = True,
        gcp_conn_id: str | None = None,
        phase: Phase = "updates",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.phase = phase
        self.settings = settings
        self.deferrable = deferrable
        self.gcp_conn_id = gcp_conn_id

    @cached_property
    def run_settings(self) -> RunSettings:
        return RunSettings.model_validate(self.settings)  # after templating: read at the first poke

    @cached_property
    def store(self) -> ObjectStore:
        """One store for every poke of this task attempt."""
        return FederationHook(self.run_settings.bucket, gcp_conn_id=self.gcp_conn_id).store

    def wait_settings(self, run: RunSettings) -> WaitSettings:
        if self.phase == "evaluations":
            return run.evaluation
        task, _ = read_document(self.store, LAYOUT.round_task(run.round_id), RoundTask)
        if task.secure_aggregation is None:
            if self.phase != "updates":
                raise AirflowFailException(f"round {run.round_id} has no secure-aggregation {self.phase} phase")
            return run.round
        # a secure round: each wait expects the clients that finished the phase before it
        if self.phase == "updates":
            expected = secagg.read_roster_document(self.store, run.round_id, "shared")
            settings = secagg.phase_wait_settings(
                task,
                "masked",
                expected,
                round_settings=run.round,
                secure=run.secure_aggregation,
                threshold=secagg.setup_threshold(self.store, run.round_id),
            )
            return run.round.model_copy(update=settings.model_dump(exclude={"deadline_seconds"}))
        expected = secagg.expected_clients(self.store, task, self.phase)
        threshold = None if self.phase == "keys" else secagg.setup_threshold(self.store, run.round_id)
        return secagg.phase_wait_settings(
            task, self.phase, expected, round_settings=run.round, secure=run.secure_aggregation, threshold=threshold
        )

    def poke(self, context: Context) -> PokeReturnValue | bool:
        run = self.run_settings
        store = self.store
        if self.phase in ("keys", "shares", "unmask"):
            return self._poke_secure_phase(run)
        if self.phase == "updates":
            closing, _ = read_optional(store, LAYOUT.round_closing(run.round_id), RoundClosing)
        else:
            closing, _ = read_optional(
                store,
                LAYOUT.evaluation_closing(run.round_id),
                EvaluationClosing,
                max_bytes=MAX_EVALUATION_CLOSING_BYTES,
            )
        if closing is not None:
            self.log.info("round %s: %s were frozen by an earlier run; using them", run.round_id, self.phase)
            return PokeReturnValue(True, self._finish(run, closing.reason))
        return self._look(run)

    def _look(self, run: RunSettings) -> PokeReturnValue | bool:
        deadline, survey = look_at_round(self.store, run.round_id, phase=self.phase)
        settings = self.wait_settings(run)
        reason = wait_decision(survey, now=utcnow(), deadline=deadline, settings=settings)
        if reason is None:
            self.log.info(
                "round %s: %d %s on time and well-formed, %d rejected; need %d by %s",
                run.round_id, len(survey.on_time), self.phase, len(survey.rejected), settings.min_clients,
                deadline.isoformat(),
            )  # fmt: skip
            return False
        return PokeReturnValue(True, self._finish(run, reason))

    def _poke_secure_phase(self, run: RunSettings) -> PokeReturnValue | bool:
        """A secure-aggregation phase: done if an earlier run already published its outcome."""
        store = self.store
        why = secagg.abandoned(store, run.round_id)
        if why is not None:
            raise AirflowSkipException(f"round {run.round_id} was abandoned by an earlier run: {why}")
        published = {"keys": LAYOUT.secagg_setup(run.round_id), "shares": LAYOUT.secagg_roster(run.round_id, "shared")}
        if self.phase in published and store.exists(published[self.phase]):
            self.log.info("round %s: secure-aggregation %s phase finished by an earlier run", run.round_id, self.phase)
            return PokeReturnValue(True, {"reason": "earlier_run"})
        return self._look(run)

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        done = self.poke(context)
        if isinstance(done, PokeReturnValue):
            return done.xcom_value
        run = self.run_settings
        self.defer(
            trigger=RoundQuorumTrigger(
                bucket=run.bucket,
                round_id=run.round_id,
                settings=self.wait_settings(run).model_dump(),
                poll_seconds=self.poke_interval,
                gcp_conn_id=self.gcp_conn_id,
                phase=self.phase,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout),
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("status") != "done":
            raise AirflowException(
                f"waiting for round {self.run_settings.round_id}'s {self.phase} failed: {event.get('message')}"
            )
        return self._finish(self.run_settings, event["reason"])

    def _finish(self, run: RunSettings, reason: str) -> dict[str, Any]:
        if self.phase == "evaluations":
            return self._finish_evaluations(run, reason)
        if self.phase in ("keys", "shares", "unmask"):
            return self._finish_secure_phase(run, reason)
        store = self.store
        task, _ = read_document(store, LAYOUT.round_task(run.round_id), RoundTask)
        closing = freeze_round(store, task, reason=reason, closed_at=utcnow())
        self.log.info(
            "round %s closed (%s): %d update(s) frozen for aggregation, %d rejected, %d unattributable object(s)",
            run.round_id, closing.reason, len(closing.updates), len(closing.late), closing.ignored_objects,
        )  # fmt: skip
        if closing.reason == "below_quorum":
            raise AirflowSkipException(
                f"round {run.round_id} abandoned: {len(closing.updates)} valid update(s) by the deadline, "
                f"fewer than {run.round.quorum_at_deadline}"
            )
        if task.secure_aggregation is not None:
            why = secagg.abandoned(store, run.round_id)
            if why is not None:  # an earlier run of this step abandoned it: the roster must not appear now
                raise AirflowSkipException(f"round {run.round_id} was abandoned by an earlier run: {why}")
            threshold = secagg.setup_threshold(store, run.round_id)
            minimum = secagg.survivors_needed(task, threshold, run.aggregation_quorum)
            try:
                masked = secagg.publish_masked_roster(store, task, closing, minimum=minimum)
            except secagg.SecAggAbandoned as exc:
                self._abandon(run, task, f"phase 3: {exc}")
            self.log.info("secure aggregation: %d masked input(s) in the sum: %s", len(masked), ", ".join(masked))
        return {"reason": closing.reason, "updates": len(closing.updates), "rejected": len(closing.late)}

    def _finish_secure_phase(self, run: RunSettings, reason: str) -> dict[str, Any]:
        """After phase 1: publish the setup; after phase 2: route the shares and publish who
        shared; after phase 4: nothing to publish (the aggregation reads the answers)."""
        store = self.store
        task, _ = read_document(store, LAYOUT.round_task(run.round_id), RoundTask)
        secure = secagg.secure_task(task)
        try:
            if self.phase == "keys":
                if reason == "below_quorum":
                    raise secagg.SecAggAbandoned("too few clients posted keys by the deadline")
                capped = privacy.capped_clients(store, run.privacy) if run.privacy.dp else set()
                if capped:
                    self.log.info("distributed dp: %d client(s) at the participation cap are left out", len(capped))
                setup = secagg.publish_setup(
                    store,
                    run.round_id,
                    clip_norm=secure.clip_norm,
                    max_clients=secure.max_clients,
                    degree=secure.degree,
                    threshold=run.secure_aggregation.threshold,
                    excluded=capped,
                )
                self.log.info(
                    "secure aggregation, phase 1 closed (%s): %d client(s) in the setup, threshold %d, %s",
                    reason, len(setup.keys), setup.threshold,
                    f"{min(len(v) for v in setup.neighbours.values())}+ neighbours each",
                )  # fmt: skip
                return {"reason": reason, "members": len(setup.keys), "threshold": setup.threshold}
            if self.phase == "shares":
                setup = secagg.read_setup_document(store, run.round_id)
                shared = secagg.route_shares(store, setup)
                dropped = sorted(set(setup.keys) - set(shared))
                self.log.info(
                    "secure aggregation, phase 2 closed (%s): %d of %d client(s) shared keys%s",
                    reason, len(shared), len(setup.keys), f"; dropped: {', '.join(dropped)}" if dropped else "",
                )  # fmt: skip
                needed = secagg.survivors_needed(task, setup.threshold, run.aggregation_quorum)
                if len(shared) < needed:  # no client should train and upload for a round that cannot finish
                    raise secagg.SecAggAbandoned(
                        f"{len(shared)} client(s) shared keys; the round needs at least {needed} masked inputs"
                    )
                return {"reason": reason, "shared": len(shared)}
        except secagg.SecAggAbandoned as exc:
            self._abandon(run, task, f"phase {self.phase}: {exc}")
        masked = secagg.read_roster_document(store, run.round_id, "masked")
        answered = secagg.survey_phase(store, task, "unmask", masked, check_ready=False).on_time
        self.log.info(
            "secure aggregation, phase 4 closed (%s): %d of %d survivor(s) answered the unmasking",
            reason, len(answered), len(masked),
        )  # fmt: skip
        return {"reason": reason, "answered": len(answered)}

    def _abandon(self, run: RunSettings, task: RoundTask, message: str) -> None:
        secagg.abandon_round(
            store=self.store,
            task=task,
            message=f"secure aggregation abandoned: {message}",
            strategy=run.aggregation.strategy,
            min_clients=run.aggregation_quorum,
        )
        raise AirflowSkipException(f"round {run.round_id}: secure aggregation abandoned: {message}")

    def _finish_evaluations(self, run: RunSettings, reason: str) -> dict[str, Any]:
        store = self.store
        task, _ = read_document(store, LAYOUT.evaluation_task(run.round_id), EvaluationTask)
        closing = freeze_evaluations(store, task, reason=reason, closed_at=utcnow())
        self.log.info(
            "round %s: evaluation closed (%s): %d client evaluation(s) frozen for the gate, %d rejected",
            run.round_id, closing.reason, len(closing.reports), len(closing.rejected),
        )  # fmt: skip
        for verdict in closing.rejected:
            self.log.info("  REJECT EVALUATION %s %s: %s", verdict.client_id, verdict.code, verdict.reason)
        if closing.reason == "below_quorum":
            self.log.warning(
                "round %s: %d client evaluation(s) by the deadline, fewer than %d: the gate will refuse the candidate",
                run.round_id, len(closing.reports), task.min_reports,
            )  # fmt: skip
        return {"reason": closing.reason, "reports": len(closing.reports), "rejected": len(closing.rejected)}
