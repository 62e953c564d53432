"""A task package: one learning problem, as one importable object that runs wherever the
federation does — ``fedbucket init``, every client, ``fedbucket simulate``, the Spark executors
that score models, and ``fedbucket participate``.

A task is a :class:`Task` bound to a module attribute and named ``package.module:attribute``
(the federation config's ``model.task``; it travels in every manifest and round task)::

    TASK = Task(
        name="spam",
        num_classes=2,
        models={"ngram": NgramClassifier},          # model.name -> factory(**model.kwargs)
        load_data=read_csv,                         # a client's data source -> Examples
        train=train_with_adam,                      # optional: default SGD + momentum, FedProx
        forward=lambda model, x: model(x),          # optional: batch preprocessing + logits
        training_extra=AdamOptions,                 # optional: schema of training.extra
    )

Invariants every place relies on:

- ``Examples.x`` is a numeric numpy array with examples on axis 0 (float features, or int64
  token ids); ``Examples.y`` is int64 in ``0 .. num_classes - 1``. The server's validation and
  test splits are safetensors files holding exactly these two tensors.
- ``forward(model, x_batch)`` returns logits of shape ``(batch, num_classes)`` for a torch
  tensor made from rows of ``x``: the one place a task preprocesses a batch.
- ``train`` changes the model in place and returns finite metrics; it is given the round's
  :class:`~fedbucket.protocol.documents.TrainingConfig`, whose ``extra`` the task's
  ``training_extra`` model has validated.

Clients import the task *they* were given (``--task``) and refuse a round that names another one:
a bucket never makes a client import code.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ValidationError

from fedbucket.protocol.documents import (
    MAX_CONFUSION_CLASSES,
    ModelScore,
    ModelSpec,
    TrainingConfig,
    describe_validation_error,
)
from fedbucket.protocol.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

#: The built-in task: scikit-learn's 8x8 digits with the small model zoo (the demo's task).
DIGITS_TASK = "fedbucket.torch.digits:TASK"


@dataclass(frozen=True)
class Examples:
    """Labelled examples: ``x`` (n, ...) numeric, ``y`` (n,) int64 class ids."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.y.dtype != np.int64 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ConfigError(
                f"examples need x with n rows and y of shape (n,) int64; got x {self.x.shape}, "
                f"y {self.y.shape} {self.y.dtype}"
            )

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray) -> Examples:
        return Examples(self.x[indices], self.y[indices])

    def split(self, fraction: float, *, seed: int) -> tuple[Examples, Examples]:
        """``(rest, held_out)``: a seeded shuffle, ``fraction`` of the examples held out (at least one
        each side when there are two or more). For data splits, not secrets."""
        order = np.random.default_rng(seed).permutation(len(self))
        cut = min(max(1, round(len(self) * fraction)), len(self) - 1) if len(self) > 1 else 0
        return self.subset(np.sort(order[cut:])), self.subset(np.sort(order[:cut]))

    def as_tensors(self) -> dict[str, np.ndarray]:
        """The ``{"x", "y"}`` state dict of a validation or test split file."""
        return {"x": np.ascontiguousarray(self.x), "y": np.ascontiguousarray(self.y)}


def default_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` on a batch, no preprocessing."""
    return model(x)


TrainFunction = Callable[..., Mapping[str, float]]
"""``train(model, examples, training, *, seed, forward) -> metrics``."""


@dataclass(frozen=True)
class Task:
    """One learning problem: its models, data, training recipe and evaluation (see module doc)."""

    name: str
    num_classes: int
    models: Mapping[str, Callable[..., nn.Module]]
    load_data: Callable[[str], Examples]
    train: TrainFunction | None = None
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] = default_forward
    training_extra: type[BaseModel] | None = None
    example_data: Callable[[int], Examples] | None = field(default=None, repr=False)
    """Data the task can make or ships (a generated corpus, a bundled dataset), for ``simulate``
    without ``--data``: ``example_data(seed)``."""

    def build_model(self, spec: ModelSpec, *, seed: int | None = None) -> nn.Module:
        """The model ``spec`` names (``spec.name`` among :attr:`models`), weights from ``seed``."""
        import torch

        if spec.name not in self.models:
            raise ConfigError(f"task {self.name!r} has no model {spec.name!r}; it has {sorted(self.models)}")
        if seed is not None:
            torch.manual_seed(seed)
        try:
            return self.models[spec.name](**spec.kwargs)
        except TypeError as exc:
            raise ConfigError(f"model {spec.name!r} of task {self.name!r}: {exc}") from None

    def check_training(self, training: TrainingConfig) -> BaseModel | None:
        """Validate ``training.extra`` against the task's schema; returns the parsed options."""
        if self.training_extra is None:
            if training.extra:
                raise ConfigError(f"task {self.name!r} takes no training.extra options; got {sorted(training.extra)}")
            return None
        try:
            return self.training_extra.model_validate(training.extra, strict=True)
        except ValidationError as exc:
            raise ConfigError(f"training.extra for task {self.name!r}: {describe_validation_error(exc)}") from None

    def fit(self, model: nn.Module, examples: Examples, training: TrainingConfig, *, seed: int) -> dict[str, float]:
        """Train ``model`` in place with the task's recipe; returns its (finite) metrics."""
        from fedbucket.torch.training import train_local

        self.check_training(training)
        train = self.train or train_local
        metrics = {
            str(k): float(v) for k, v in train(model, examples, training, seed=seed, forward=self.forward).items()
        }
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if bad:
            raise ConfigError(f"task {self.name!r}: training returned non-finite metrics {bad}")
        return metrics

    def score(self, model: nn.Module, examples: Examples, *, batch_size: int = 1024) -> ModelScore:
        """Summed cross-entropy and per-class counts of ``model`` on ``examples``: enough to
        recompute loss, accuracy and macro-F1 exactly when scores of many sites are added."""
        import torch

        classes = self.num_classes
        true_positive = np.zeros(classes, dtype=np.int64)
        confusion = np.zeros((classes, classes), dtype=np.int64) if classes <= MAX_CONFUSION_CLASSES else None
        predicted = np.zeros(classes, dtype=np.int64)
        actual = np.zeros(classes, dtype=np.int64)
        loss_sum, non_finite = 0.0, 0
        model.eval()
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                x = torch.from_numpy(np.array(examples.x[start : start + batch_size]))  # a writable copy
                y = examples.y[start : start + batch_size]
                logits = self.forward(model, x)
                if logits.ndim != 2 or logits.shape[1] != classes:
                    raise ConfigError(f"task {self.name!r}: logits of shape {tuple(logits.shape)}, need (n, {classes})")
                if y.size and (y.min() < 0 or y.max() >= classes):
                    raise ConfigError(f"task {self.name!r}: labels must be in 0..{classes - 1}")
                labels = torch.from_numpy(y.copy())
                losses = torch.nn.functional.cross_entropy(logits.double(), labels, reduction="none")
                finite = torch.isfinite(losses)
                non_finite += int((~finite).sum())  # a diverged model: counted, so its metrics say "not finite"
                loss_sum += float(losses[finite].sum())
                guess = logits.argmax(dim=1).numpy()
                np.add.at(true_positive, y[guess == y], 1)
                np.add.at(predicted, guess, 1)
                np.add.at(actual, y, 1)
                if confusion is not None:  # rows: the true class, columns: the predicted one
                    np.add.at(confusion, (y, guess), 1)
        return ModelScore(
            examples=len(examples),
            loss_sum=loss_sum,
            non_finite=non_finite,
            true_positive=true_positive.tolist(),
            false_positive=(predicted - true_positive).tolist(),
            false_negative=(actual - true_positive).tolist(),
            confusion=confusion.tolist() if confusion is not None else None,
        )


@functools.cache
def load_task(reference: str | None) -> Task:
    """Import the task ``package.module:attribute`` (``None``: the built-in digits task). The
    attribute is a :class:`Task`, or a function of no arguments that returns one (called once:
    the result is cached per process).

    A bad reference is a :class:`ConfigError` that says where the task must be importable.
    """
    reference = reference or DIGITS_TASK
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"task {reference!r} must look like 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import task module {module_name!r} ({exc}); install the task package where this runs "
            "(docs/client-guide.md, docs/operations.md)"
        ) from None
    task = getattr(module, attribute, None)
    if callable(task) and not isinstance(task, Task):
        task = task()
    if not isinstance(task, Task):
        raise ConfigError(f"{reference} is {type(task).__name__}, not a fedbucket.torch.task.Task")
    return task


def example_split(task: Task, *, seed: int, holdout_fraction: float) -> tuple[Examples, Examples, Examples]:
    """``(clients' pool, validation, test)`` of the task's example data: the one split that
    ``fedbucket init`` (the server's splits) and ``fedbucket simulate`` (the clients' data) share,
    so that with the same seed and fraction they never overlap. ``holdout_fraction`` of the data
    is held out and halved into validation and test."""
    if task.example_data is None:
        raise ConfigError(f"task {task.name!r} makes no example data; give the data files explicitly")
    pool, held_out = task.example_data(seed).split(holdout_fraction, seed=seed)
    test, validation = held_out.split(0.5, seed=seed)
    return pool, validation, test


def task_for(spec: ModelSpec) -> Task:
    """The task a model spec belongs to."""
    return load_task(spec.task)


def build_model(spec: ModelSpec, *, seed: int | None = None) -> nn.Module:
    """Instantiate ``spec`` with its task's model factory (weights from ``seed`` when given)."""
    return task_for(spec).build_model(spec, seed=seed)


def examples_from(tensors: Mapping[str, Any]) -> Examples:
    """Examples from a split file's ``{"x", "y"}`` tensors."""
    if set(tensors) != {"x", "y"}:
        raise ConfigError(f"a split must hold exactly two tensors, x and y; got {sorted(tensors)}")
    return Examples(np.asarray(tensors["x"]), np.asarray(tensors["y"]))
