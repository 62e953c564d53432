"""Evaluation of a round's candidate against the round's base model: what the gate sees.

Three sources, each optional, all written to ``rounds/<round>/evaluation.json``:

- ``validation``: the server's validation split (``eval/validation.safetensors``), if the
  operator holds one — candidate and base; it may gate promotion;
- ``test``: the server's test split (``eval/test.safetensors``) — the candidate only, reported
  and never compared, so the figure a report quotes is not the one promotion selected on;
- ``federated``: the clients' own scores of both models (``evaluation-closing.json``), pooled
  after trimming the most extreme reports (:func:`federated_metrics`); it may gate promotion.

Splits are cut into row ranges; :func:`score_rows` scores models on one range with the task's
own ``forward`` (its batch preprocessing) and returns :class:`ModelScore` sums, which add up
across ranges and across clients alike. The Spark job maps it over ranges in executors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from fedbucket.protocol.documents import (
    MAX_EVALUATION_CLOSING_BYTES,
    ClassMetrics,
    EvaluationClosing,
    EvaluationReport,
    EvaluationTask,
    FederatedMetrics,
    ModelManifest,
    ModelMetrics,
    ModelScore,
    ModelSpec,
    SplitMetrics,
    read_document,
    read_optional,
    write_document,
)
from fedbucket.protocol.errors import SchemaError
from fedbucket.protocol.layout import LAYOUT, BucketLayout
from fedbucket.protocol.storage import ObjectStore, cached_store
from fedbucket.protocol.tensors import NUMPY_DTYPES, Header, read_header, tensors_from_bytes
from fedbucket.server.engine import Engine, serial_engine

DEFAULT_ROWS_PER_TASK = 4096


@dataclass(frozen=True)
class SplitPlan:
    """Where one split's rows live, and the models to score on them (picklable for executors)."""

    store_url: str
    split_name: str
    generation: int
    x_offset: int
    x_row_bytes: int
    x_dtype: str
    x_shape_tail: tuple[int, ...]
    y_offset: int
    models: tuple[tuple[str, str, int, str], ...]  # (label, payload name, generation, ModelSpec JSON)


@functools.lru_cache(maxsize=4)
def _load_model(store_url: str, name: str, generation: int, spec_json: str):  # noqa: ANN202 - torch module
    from fedbucket.torch.task import build_model
    from fedbucket.torch.training import load_global_weights

    store = cached_store(store_url)
    data = store.read_range(name, 0, store.stat(name).size, generation=generation)
    model = build_model(ModelSpec.model_validate_json(spec_json))
    load_global_weights(model, tensors_from_bytes(data))
    model.eval()
    return model


def score_rows(plan: SplitPlan, rows: tuple[int, int]) -> dict[str, ModelScore]:
    """Each model's :class:`ModelScore` on rows ``[start, stop)`` of the split."""
    from fedbucket.torch.task import Examples, task_for

    start, stop = rows
    store = cached_store(plan.store_url)
    x_raw = store.read_range(
        plan.split_name,
        plan.x_offset + start * plan.x_row_bytes,
        plan.x_offset + stop * plan.x_row_bytes,
        generation=plan.generation,
    )
    y_raw = store.read_range(
        plan.split_name, plan.y_offset + start * 8, plan.y_offset + stop * 8, generation=plan.generation
    )
    x = np.frombuffer(x_raw, dtype=NUMPY_DTYPES[plan.x_dtype]).reshape(stop - start, *plan.x_shape_tail)
    examples = Examples(x, np.frombuffer(y_raw, dtype=np.int64))
    out = {}
    for label, name, generation, spec_json in plan.models:
        task = task_for(ModelSpec.model_validate_json(spec_json))
        out[label] = task.score(_load_model(plan.store_url, name, generation, spec_json), examples)
    return out


def add_scores(scores: Iterable[ModelScore]) -> ModelScore:
    """The sum of scores of the same model on disjoint examples (in iteration order: deterministic).

    Built without re-validation: a sum may exceed the bounds one client's report must respect."""
    scores = list(scores)
    if not scores:
        raise ValueError("no scores to add")
    return ModelScore.model_construct(
        examples=sum(s.examples for s in scores),
        loss_sum=math.fsum(s.loss_sum for s in scores),
        non_finite=sum(s.non_finite for s in scores),
        true_positive=np.sum([s.true_positive for s in scores], axis=0).tolist(),
        false_positive=np.sum([s.false_positive for s in scores], axis=0).tolist(),
        false_negative=np.sum([s.false_negative for s in scores], axis=0).tolist(),
        confusion=np.sum([s.confusion for s in scores], axis=0).tolist()
        if all(s.confusion is not None for s in scores)
        else None,
    )


def metrics_from_score(version: str, score: ModelScore) -> ModelMetrics:
    """Loss, accuracy, macro-F1 (over classes present in the examples) and per-class figures."""
    tp = np.asarray(score.true_positive, dtype=np.float64)
    predicted = tp + np.asarray(score.false_positive, dtype=np.float64)
    actual = tp + np.asarray(score.false_negative, dtype=np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(tp), where=denominator > 0)
    present = actual > 0
    n = score.examples
    loss = score.loss_sum / n if n and not score.non_finite else math.nan
    return ModelMetrics(
        version=version,
        loss=loss,
        accuracy=float(tp.sum() / n) if n else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        finite=math.isfinite(loss),
        per_class={
            str(c): ClassMetrics(
                precision=float(precision[c]), recall=float(recall[c]), f1=float(f1[c]), support=int(actual[c])
            )
            for c in range(len(tp))
        },
        confusion=score.confusion,
    )


def gate_difference(metric: str, candidate: ModelMetrics, current: ModelMetrics) -> float:
    """How much better the candidate is on ``metric`` (positive: better; loss counts downwards).
    A candidate with non-finite losses is infinitely worse; a non-finite base, infinitely better."""
    if not candidate.finite:
        return -math.inf
    if not current.finite:
        return math.inf
    if metric == "loss":
        return current.loss - candidate.loss
    return getattr(candidate, metric) - getattr(current, metric)


def federated_metrics(
    closing: EvaluationClosing, task: EvaluationTask, *, metric: str, candidate_version: str
) -> FederatedMetrics:
    """What the clients' scores say, robustly.

    Each report's candidate-minus-base difference on the gate ``metric`` is computed from its own
    counts (a diverged candidate: minus infinity). The ``k`` reports with the highest and the ``k``
    with the lowest difference are set aside (``k = ceil(trim_fraction * n)``, capped so at least
    one report remains; ties broken by client id). The gate compares ``difference``: the mean of
    the kept reports' differences weighted by their example counts — a weighted mean, so it lies
    within the kept reports' range, and one client's well-formed lie is either trimmed or lies
    between honest differences: alone it cannot move the gate past them, whatever the metric.
    The kept reports' counts are also added up into pooled candidate and base figures (exact
    loss, accuracy and macro-F1 of the kept clients' validation data), reported for people.
    """
    reports = [closed.report for closed in closing.reports]
    result = FederatedMetrics(reports=len(reports), rejected=closing.rejected, quorum=task.min_reports, metric=metric)
    if not reports:
        return result
    ranked = []
    for report in reports:
        candidate = metrics_from_score(candidate_version, report.candidate)
        current = metrics_from_score(report.base_model_version, report.current)
        ranked.append((gate_difference(metric, candidate, current), report.client_id, report))
    ranked.sort(key=lambda item: (item[0], item[1]))
    n = len(ranked)
    # round() first: 0.07 * 100 is 7.000000000000001 in floating point, and must trim 7, not 8.
    k = min(math.ceil(round(task.trim_fraction * n, 9)), (n - 1) // 2)
    kept, trimmed = ranked[k : n - k], ranked[:k] + ranked[n - k :]
    weights = [r.candidate.examples for _, _, r in kept]
    differences = [d for d, _, _ in kept]
    difference = None  # a diverged model among the kept reports: the pooled figures say "not finite"
    if all(math.isfinite(d) for d in differences):
        difference = math.fsum(w * d for w, d in zip(weights, differences, strict=True)) / sum(weights)
    pooled_candidate = add_scores(r.candidate for _, _, r in kept)
    pooled_current = add_scores(r.current for _, _, r in kept)
    return result.model_copy(
        update={
            "difference": difference,
            "used": sorted(client for _, client, _ in kept),
            "trimmed": sorted(client for _, client, _ in trimmed),
            "examples": pooled_candidate.examples,
            "candidate": metrics_from_score(candidate_version, pooled_candidate),
            "current": metrics_from_score(task.base_model_version, pooled_current),
        }
    )


def split_plan(
    store: ObjectStore, split_name: str, models: tuple[tuple[str, str, int, str], ...]
) -> tuple[SplitPlan, int]:
    """The plan for scoring ``models`` on a split file; returns it and the split's row count."""
    info = store.stat(split_name)
    with store.open_reader(split_name, generation=info.generation) as fp:
        header: Header = read_header(fp, info.size)
    if set(header.tensors) != {"x", "y"} or header.tensors["y"].dtype != "I64":
        raise SchemaError(f"{split_name} must hold tensors x and y (int64 labels)")
    x, y = header.tensors["x"], header.tensors["y"]
    rows = x.shape[0] if x.shape else 0
    if y.shape != (rows,):
        raise SchemaError(f"{split_name}: x and y disagree on the number of examples")
    plan = SplitPlan(
        store_url=store.url,
        split_name=split_name,
        generation=info.generation,
        x_offset=x.start,
        x_row_bytes=(x.end - x.start) // max(rows, 1),
        x_dtype=x.dtype,
        x_shape_tail=tuple(x.shape[1:]),
        y_offset=y.start,
        models=models,
    )
    return plan, rows


def score_split(
    store: ObjectStore,
    split_name: str,
    models: tuple[tuple[str, str, int, str], ...],
    *,
    engine: Engine,
    rows_per_task: int,
) -> tuple[int, dict[str, ModelScore]]:
    """Score ``models`` on the split ``split_name`` with ``engine``; returns rows and scores."""
    plan, rows = split_plan(store, split_name, models)
    ranges = [(start, min(start + rows_per_task, rows)) for start in range(0, rows, rows_per_task)]
    parts = engine(functools.partial(score_rows, plan), ranges)
    return rows, {label: add_scores(p[label] for p in parts) for label, *_ in models}


def run_evaluation(
    store: ObjectStore,
    round_id: str,
    *,
    metric: str = "accuracy",
    engine: Engine = serial_engine,
    rows_per_task: int = DEFAULT_ROWS_PER_TASK,
    layout: BucketLayout = LAYOUT,
    log: Callable[[str], None] = lambda message: None,
) -> EvaluationReport:
    """Evaluate round ``round_id``'s candidate from every source present; write ``evaluation.json``.

    The comparison is with the model the candidate was built on (the round's base), so a re-run
    of an old round reproduces its evaluation whatever the current model is now. ``metric`` is
    the gate metric (federated trimming ranks clients by it).
    """
    candidate, _ = read_document(store, layout.candidate_manifest(round_id), ModelManifest)
    if candidate.base_version is None:
        raise SchemaError(f"candidate of round {round_id} names no base model")
    base, _ = read_document(store, layout.model_manifest(candidate.base_version), ModelManifest)
    candidate_model = (
        "candidate",
        layout.candidate_payload(round_id),
        store.stat(layout.candidate_payload(round_id)).generation,
        candidate.model.model_dump_json(),
    )
    base_model = (
        "current",
        layout.model_payload(base.version),
        store.stat(layout.model_payload(base.version)).generation,
        base.model.model_dump_json(),
    )
    validation = test = federated = None
    if store.exists(layout.validation_split):
        rows, scores = score_split(
            store, layout.validation_split, (candidate_model, base_model), engine=engine, rows_per_task=rows_per_task
        )
        validation = SplitMetrics(
            examples=rows,
            candidate=metrics_from_score(candidate.version, scores["candidate"]),
            current=metrics_from_score(base.version, scores["current"]),
        )
        log(f"validation split, {rows} examples: {_pair(validation.candidate, validation.current)}")
    if store.exists(layout.test_split):
        rows, scores = score_split(
            store, layout.test_split, (candidate_model,), engine=engine, rows_per_task=rows_per_task
        )
        test = metrics_from_score(candidate.version, scores["candidate"])
        log(f"test split (reported only), {rows} examples: candidate {_line(test)}")
    closing, _ = read_optional(
        store, layout.evaluation_closing(round_id), EvaluationClosing, max_bytes=MAX_EVALUATION_CLOSING_BYTES
    )
    if closing is not None:
        task, _ = read_document(store, layout.evaluation_task(round_id), EvaluationTask)
        federated = federated_metrics(closing, task, metric=metric, candidate_version=candidate.version)
        if federated.candidate is not None and federated.current is not None:
            log(
                f"federated: {federated.reports} report(s), pooled {len(federated.used)} "
                f"({federated.examples} examples), trimmed {federated.trimmed or 'none'}: "
                f"{_pair(federated.candidate, federated.current)}"
            )
        else:
            log(f"federated: no client evaluation accepted ({len(federated.rejected)} rejected)")
    report = EvaluationReport(round_id=round_id, validation=validation, test=test, federated=federated)
    write_document(store, layout.evaluation_report(round_id), report)
    return report


def _line(m: ModelMetrics) -> str:
    return f"loss {m.loss:.4f} accuracy {m.accuracy:.4f} macro-F1 {m.macro_f1:.4f}"


def _pair(candidate: ModelMetrics, current: ModelMetrics) -> str:
    return f"candidate {_line(candidate)} | base {current.version} {_line(current)}"
