"""Evaluation of a candidate and the current model on the held-out split.

The split (``eval/holdout.safetensors``: ``x`` features, ``y`` int64 labels) is cut into row
ranges; :func:`evaluate_rows` scores both models on one range and returns a confusion matrix and
a loss sum per model, which add up across ranges. The Spark job maps it over ranges in executors;
:func:`summarise` turns the totals into loss, accuracy, macro-F1 and per-class figures.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedbucket.protocol.documents import (
    ClassMetrics,
    EvaluationReport,
    ModelManifest,
    ModelMetrics,
    ModelSpec,
    read_document,
    write_document,
)
from fedbucket.protocol.errors import SchemaError
from fedbucket.protocol.layout import LAYOUT, BucketLayout
from fedbucket.protocol.storage import ObjectStore, cached_store
from fedbucket.protocol.tensors import Header, read_header, tensors_from_bytes
from fedbucket.server.engine import Engine, serial_engine
from fedbucket.server.rounds import current_model

DEFAULT_ROWS_PER_TASK = 4096


@dataclass(frozen=True)
class _EvalPlan:
    store_url: str
    holdout_name: str
    holdout_generation: int
    x_offset: int
    x_row_bytes: int
    x_dtype: str
    x_shape_tail: tuple[int, ...]
    y_offset: int
    num_classes: int
    models: tuple[tuple[str, str, int, str], ...]  # (label, payload name, generation, ModelSpec JSON)


@functools.lru_cache(maxsize=4)
def _load_model(store_url: str, name: str, generation: int, spec_json: str):  # noqa: ANN202 - torch module
    from fedbucket.torch.training import load_global_weights
    from fedbucket.torch.zoo import build_model

    data = cached_store(store_url).read_range(name, 0, cached_store(store_url).stat(name).size, generation=generation)
    model = build_model(ModelSpec.model_validate_json(spec_json))
    load_global_weights(model, tensors_from_bytes(data))
    model.eval()
    return model


def evaluate_rows(plan: _EvalPlan, rows: tuple[int, int]) -> dict[str, tuple[np.ndarray, float]]:
    """Confusion matrix (true x predicted) and summed cross-entropy of each model on ``rows``."""
    import torch

    from fedbucket.protocol.tensors import NUMPY_DTYPES

    start, stop = rows
    store = cached_store(plan.store_url)
    dtype = NUMPY_DTYPES[plan.x_dtype]
    x_raw = store.read_range(
        plan.holdout_name,
        plan.x_offset + start * plan.x_row_bytes,
        plan.x_offset + stop * plan.x_row_bytes,
        generation=plan.holdout_generation,
    )
    y_raw = store.read_range(
        plan.holdout_name, plan.y_offset + start * 8, plan.y_offset + stop * 8, generation=plan.holdout_generation
    )
    x = torch.from_numpy(np.frombuffer(x_raw, dtype=dtype).reshape(stop - start, *plan.x_shape_tail).copy())
    y = np.frombuffer(y_raw, dtype=np.int64)
    out = {}
    with torch.no_grad():
        for label, name, generation, spec in plan.models:
            logits = _load_model(plan.store_url, name, generation, spec)(x)
            losses = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y.copy()), reduction="none")
            predicted = logits.argmax(dim=1).numpy()
            if logits.shape[1] > plan.num_classes or (y.size and y.max() >= plan.num_classes):
                raise SchemaError(
                    f"model {name} has {logits.shape[1]} outputs; hold-out labels need {plan.num_classes} classes"
                )
            confusion = np.zeros((plan.num_classes, plan.num_classes), dtype=np.int64)
            np.add.at(confusion, (y, predicted), 1)
            out[label] = (confusion, float(losses.double().sum().item()))
    return out


def summarise(version: str, confusion: np.ndarray, loss_sum: float) -> ModelMetrics:
    """Loss, accuracy, macro-F1 and per-class precision/recall/F1 from totals."""
    n = int(confusion.sum())
    true_positive = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    actual = confusion.sum(axis=1).astype(np.float64)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros_like(true_positive), where=actual > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(true_positive), where=denominator > 0)
    present = actual > 0
    loss = loss_sum / n if n else math.nan
    return ModelMetrics(
        version=version,
        loss=loss,
        accuracy=float(true_positive.sum() / n) if n else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        finite=math.isfinite(loss),
        per_class={
            str(c): ClassMetrics(
                precision=float(precision[c]), recall=float(recall[c]), f1=float(f1[c]), support=int(actual[c])
            )
            for c in range(len(actual))
        },
    )


def _holdout_plan(
    store: ObjectStore, models: Sequence[tuple[str, str, int, str]], num_classes: int, layout: BucketLayout
) -> tuple[_EvalPlan, int]:
    info = store.stat(layout.holdout)
    with store.open_reader(layout.holdout, generation=info.generation) as fp:
        header: Header = read_header(fp, info.size)
    if set(header.tensors) != {"x", "y"} or header.tensors["y"].dtype != "I64":
        raise SchemaError(f"{layout.holdout} must hold tensors x and y (int64 labels)")
    x, y = header.tensors["x"], header.tensors["y"]
    rows = x.shape[0]
    if y.shape != (rows,):
        raise SchemaError("hold-out x and y disagree on the number of examples")
    row_bytes = (x.end - x.start) // max(rows, 1)
    plan = _EvalPlan(
        store_url=store.url,
        holdout_name=layout.holdout,
        holdout_generation=info.generation,
        x_offset=x.start,
        x_row_bytes=row_bytes,
        x_dtype=x.dtype,
        x_shape_tail=tuple(x.shape[1:]),
        y_offset=y.start,
        num_classes=num_classes,
        models=tuple(models),
    )
    return plan, rows


def run_evaluation(
    store: ObjectStore,
    round_id: str,
    *,
    engine: Engine = serial_engine,
    rows_per_task: int = DEFAULT_ROWS_PER_TASK,
    num_classes: int | None = None,
    layout: BucketLayout = LAYOUT,
    log: Callable[[str], None] = lambda message: None,
) -> EvaluationReport:
    """Score round ``round_id``'s candidate and the round's base model; write ``evaluation.json``.

    The comparison is with the model the candidate was built on (the round's base), so that a
    re-run of an old round reproduces its evaluation whatever the current model is now.
    """
    candidate, _ = read_document(store, layout.candidate_manifest(round_id), ModelManifest)
    base_version = candidate.base_version or current_model(store, layout=layout)[0].version
    base, _ = read_document(store, layout.model_manifest(base_version), ModelManifest)
    models = []
    for label, name, manifest in (
        ("candidate", layout.candidate_payload(round_id), candidate),
        ("current", layout.model_payload(base.version), base),
    ):
        models.append((label, name, store.stat(name).generation, manifest.model.model_dump_json()))
    if num_classes is None:  # from the labels themselves (a few bytes per example)
        holdout = store.stat(layout.holdout)
        with store.open_reader(layout.holdout, generation=holdout.generation) as fp:
            y = read_header(fp, holdout.size).tensors["y"]
        labels = np.frombuffer(store.read_range(layout.holdout, y.start, y.end), dtype=np.int64)
        num_classes = int(labels.max()) + 1 if labels.size else 1
    plan, rows = _holdout_plan(store, models, num_classes, layout)
    ranges = [(start, min(start + rows_per_task, rows)) for start in range(0, rows, rows_per_task)]
    log(f"evaluating candidate {candidate.version} and base {base.version} on {rows} examples in {len(ranges)} task(s)")
    parts = engine(functools.partial(evaluate_rows, plan), ranges)
    totals = {}
    for label in ("candidate", "current"):
        confusion = sum((p[label][0] for p in parts), np.zeros((num_classes, num_classes), dtype=np.int64))
        loss = 0.0
        for p in parts:  # range order: the same sum on every run
            loss += p[label][1]
        totals[label] = (confusion, loss)
    report = EvaluationReport(
        round_id=round_id,
        examples=rows,
        candidate=summarise(candidate.version, *totals["candidate"]),
        current=summarise(base.version, *totals["current"]),
    )
    write_document(store, layout.evaluation_report(round_id), report)
    for label in ("candidate", "current"):
        m = getattr(report, label)
        log(f"  {label:9s} {m.version}: loss {m.loss:.4f} accuracy {m.accuracy:.4f} macro-F1 {m.macro_f1:.4f}")
    return report
