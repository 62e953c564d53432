"""The federation over time, as people look at it: rounds, one round, the model registry, clients.

Everything here is read from the bucket through the protocol's documents (the same ones the DAG
writes), so the Airflow page, ``fedbucket report`` and the task logs cannot disagree. A finished
round's documents never change (a re-run writes the same bytes), so documents are cached by
(object name, generation): a page over 1,000 rounds re-reads only what changed since the last one.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fedbucket.protocol.documents import (
    AggregationReport,
    DocumentT,
    EvaluationReport,
    ModelManifest,
    ModelPointer,
    RoundClosing,
    RoundReport,
    RoundTask,
    read_document,
    read_optional,
)
from fedbucket.protocol.errors import ObjectNotFound, SchemaError
from fedbucket.protocol.layout import LAYOUT, BucketLayout
from fedbucket.protocol.storage import ObjectStore

#: The figures a round row shows, by the gate's source: held-out validation, else the clients' pooled scores.
FIGURES = ("accuracy", "macro_f1", "loss")


@dataclass(frozen=True)
class RoundRow:
    """One round in the overview."""

    round_id: str
    opened_at: datetime | None
    base_version: str
    status: str
    message: str
    promoted_version: str | None
    accepted: int
    rejected: dict[str, int]  # code -> count (late included)
    source: str | None  # "validation" or "federated": where the figures come from
    candidate: dict[str, float]
    current: dict[str, float]
    epsilon: float | None
    clip_norm: float | None
    secure: bool
    timings: dict[str, float]  # the aggregation's phases (validate_s, aggregate_s, write_s, total_s)
    wait_seconds: float | None  # from opening the round to freezing it
    airflow: dict[str, str]  # the DAG run that first reported it


@dataclass(frozen=True)
class ModelRow:
    version: str
    parent: str | None
    round_id: str | None
    strategy: str | None
    strategy_options: dict[str, Any]
    clients: list[str]
    private: bool
    sha256: str
    size_bytes: int
    metrics: dict[str, float]  # the gate's figures of the round that made it


@dataclass(frozen=True)
class RoundDetail:
    row: RoundRow
    report: RoundReport
    task: RoundTask | None
    aggregation: AggregationReport | None
    evaluation: EvaluationReport | None


@dataclass
class FederationView:
    """Read-only view of one federation's bucket, with a document cache (thread-safe: the Airflow
    page serves several requests at once)."""

    store: ObjectStore
    layout: BucketLayout = LAYOUT
    _cache: dict[tuple, Any] = field(default_factory=dict)
    _reports: dict[str, RoundReport] = field(default_factory=dict)  # the latest report of each round seen
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _read(self, name: str, generation: int, cls: type[DocumentT]) -> DocumentT | None:
        key = (name, generation)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        try:
            doc, _ = read_document(self.store, name, cls)
        except (ObjectNotFound, SchemaError):
            doc = None
        with self._lock:
            if len(self._cache) > 20_000:  # bound memory: a page reads far fewer
                self._cache.clear()
            self._cache[key] = doc
        return doc

    def _optional(self, name: str, cls: type[DocumentT]) -> DocumentT | None:
        try:
            info = self.store.stat(name)
        except ObjectNotFound:
            return None
        return self._read(name, info.generation, cls)

    # -- rounds ------------------------------------------------------------------------------

    def rounds(self) -> list[RoundRow]:
        """Every round that has a report, oldest first (by when it opened). One listing per call;
        a round's row is built once per version of its report (its task and aggregation report
        are read then, and never again)."""
        rows = []
        for info in self.store.list("rounds/", match_glob="rounds/*/report.json"):
            key = ("row", info.name, info.generation)
            with self._lock:
                cached = self._cache.get(key)
            if cached is None:
                report = self._read(info.name, info.generation, RoundReport)
                cached = (self._row(report), report) if report is not None else (None, None)
                with self._lock:
                    self._cache[key] = cached
            if cached[0] is not None:
                rows.append(cached[0])
                self._reports[cached[0].round_id] = cached[1]
        return sorted(rows, key=lambda r: (r.opened_at is not None, r.opened_at, r.round_id))  # unknown: oldest

    def _row(self, report: RoundReport) -> RoundRow:
        task = self._optional(self.layout.round_task(report.round_id), RoundTask)
        aggregation = self._optional(self.layout.aggregation_report(report.round_id), AggregationReport)
        closing = self._optional(self.layout.round_closing(report.round_id), RoundClosing)
        wait = None
        if task is not None and closing is not None:  # the wait: from opening the round to freezing it
            wait = max(0.0, (closing.closed_at - task.opened_at).total_seconds())
        source, candidate, current = gate_figures(report.metrics)
        rejected = Counter(u.code for u in report.updates if not u.accepted)
        privacy = report.privacy
        return RoundRow(
            round_id=report.round_id,
            opened_at=task.opened_at if task else None,
            base_version=report.base_model_version,
            status=report.status,
            message=report.message,
            promoted_version=report.promoted_version,
            accepted=sum(1 for u in report.updates if u.accepted),
            rejected=dict(sorted(rejected.items())),
            source=source,
            candidate=candidate,
            current=current,
            epsilon=privacy.spent.epsilon if privacy else None,
            clip_norm=privacy.mechanism.clip_norm if privacy else None,
            secure=bool(task and task.secure_aggregation),
            timings=dict(aggregation.timings) if aggregation else {},
            wait_seconds=wait,
            airflow=dict(report.airflow),
        )

    def round_detail(self, round_id: str) -> RoundDetail | None:
        report = self._optional(self.layout.round_report(round_id), RoundReport)
        if report is None:
            return None
        return RoundDetail(
            row=self._row(report),
            report=report,
            task=self._optional(self.layout.round_task(round_id), RoundTask),
            aggregation=self._optional(self.layout.aggregation_report(round_id), AggregationReport),
            evaluation=self._optional(self.layout.evaluation_report(round_id), EvaluationReport),
        )

    # -- the model registry --------------------------------------------------------------------

    def models(self, rounds: Sequence[RoundRow] | None = None) -> tuple[list[ModelRow], str | None]:
        """Every published model (newest last) and the current pointer's version."""
        pointer, _ = read_optional(self.store, self.layout.current_model, ModelPointer)
        rounds = list(rounds if rounds is not None else self.rounds())
        figures = {r.base_version: r.current for r in rounds if r.current}  # a base, as its round saw it
        figures |= {r.promoted_version: r.candidate for r in rounds if r.promoted_version}
        rows = []
        for info in self.store.list("models/", match_glob="models/*/manifest.json"):
            manifest = self._read(info.name, info.generation, ModelManifest)
            if manifest is None:
                continue
            lineage = manifest.lineage or {}
            rows.append(
                ModelRow(
                    version=manifest.version,
                    parent=manifest.base_version,
                    round_id=manifest.round_id,
                    strategy=lineage.get("strategy"),
                    strategy_options=dict(lineage.get("strategy_options") or {}),
                    clients=[a["client_id"] for a in lineage.get("accepted", []) if isinstance(a, dict)],
                    private="privacy" in lineage,
                    sha256=manifest.sha256,
                    size_bytes=manifest.size_bytes,
                    metrics=figures.get(manifest.version, {}),
                )
            )
        order = {r.round_id: i for i, r in enumerate(rounds)}
        rows.sort(key=lambda m: (m.round_id is not None, order.get(m.round_id, -1), m.version))
        return rows, pointer.version if pointer else None

    # -- clients -------------------------------------------------------------------------------

    def participation(self, rows: Sequence[RoundRow] | None = None) -> tuple[list[str], list[str], dict]:
        """(clients, round ids, {(client, round): code}) with code ``accepted`` or a rejection code."""
        rows = list(rows if rows is not None else self.rounds())
        cells: dict[tuple[str, str], str] = {}
        for row in rows:
            report = self._reports.get(row.round_id) or self._optional(
                self.layout.round_report(row.round_id), RoundReport
            )
            for update in report.updates if report else []:
                cells[(update.client_id, row.round_id)] = "accepted" if update.accepted else update.code
        clients = sorted({c for c, _ in cells})
        return clients, [r.round_id for r in rows], cells


def gate_figures(metrics: dict[str, Any]) -> tuple[str | None, dict[str, float], dict[str, float]]:
    """(source, candidate figures, current figures) from a round report's ``metrics``: the
    server's validation split if it had one, else the clients' pooled (federated) scores."""
    for source in ("validation", "federated"):
        split = metrics.get(source)
        if isinstance(split, dict) and isinstance(split.get("candidate"), dict):
            pick = lambda m: {k: float(m[k]) for k in FIGURES if isinstance(m.get(k), int | float)}  # noqa: E731
            return source, pick(split["candidate"]), pick(split.get("current") or {})
    return None, {}, {}
