"""The task a federation names as ``model.task = "fedbucket_textclf.task:TASK"``: classify chat
messages as offensive (1) or not (0) with a hashed n-gram :class:`NgramClassifier`.

- data: :func:`~fedbucket_textclf.data.read_csv` (a client's ``--data`` is a CSV of text,label);
- model: ``"ngram"``, kwargs ``buckets`` (16384) and ``dim`` (32); ``num_classes`` must stay 2;
- training: :func:`train_adamw`, tuned by ``training.extra`` (:class:`TrainingExtra`);
- batches go to the model as they are (the default ``forward``): the tokenizer already made ids.

Invariant: importing this module is cheap and has no side effects beyond importing torch (it runs
in every client, ``fedbucket init``, the Airflow publish step and every Spark executor that
scores a model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedbucket.protocol.documents import TrainingConfig
from fedbucket.torch.task import Examples, Task
from fedbucket.torch.training import run_epochs
from fedbucket_textclf.data import examples_from_rows, generate_corpus, read_csv
from fedbucket_textclf.model import NgramClassifier

#: Rows of the generated corpus ``fedbucket simulate`` deals out when given no data.
EXAMPLE_ROWS = 4000


class TrainingExtra(BaseModel):
    """``training.extra`` options of this task (validated strictly: ``1`` is no string, ``"0.1"``
    no float)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    optimizer: Literal["adamw", "sgd"] = Field(
        default="adamw", description="adamw, or sgd with momentum 0.9 (the default fedbucket recipe)"
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="decoupled (adamw) or L2 (sgd) weight decay")
    class_weight_offensive: float = Field(
        default=1.0,
        gt=0,
        le=20,
        description="weight of the offensive class in the cross-entropy (> 1 when offensive messages are rare)",
    )


def train_adamw(
    model: nn.Module,
    examples: Examples,
    training: TrainingConfig,
    *,
    seed: int = 0,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """This task's recipe (``Task.train``): AdamW by default (``training.extra``: :class:`TrainingExtra`)
    for ``training.local_epochs`` passes of shuffled mini-batches, plus the FedProx term when
    ``training.proximal_mu > 0``. Trains ``model`` in place; returns its loss and accuracy on
    ``examples``.

    Deterministic for a given ``seed`` on one machine: the loop is fedbucket's ``run_epochs``
    (seeded shuffles), with this task's optimiser and class-weighted loss.
    """
    # Task.fit validated these already; parsing again gives typed options (and guards a direct call).
    options = TrainingExtra.model_validate(training.extra, strict=True)
    if options.optimizer == "adamw":
        optimiser: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=training.learning_rate, weight_decay=options.weight_decay
        )
    else:
        optimiser = torch.optim.SGD(
            model.parameters(), lr=training.learning_rate, momentum=0.9, weight_decay=options.weight_decay
        )
    # Class weights in label order (not offensive, offensive): the task is binary.
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, options.class_weight_offensive]))
    # fedbucket's loop: seeded shuffles, mini-batches, the FedProx term anchored at the round's weights.
    return run_epochs(model, examples, training, optimiser, loss_fn, seed=seed, forward=forward)


def example_examples(seed: int) -> Examples:
    """The task's own data for ``fedbucket simulate`` without ``--data``: a generated corpus."""
    return examples_from_rows(generate_corpus(EXAMPLE_ROWS, seed))


TASK = Task(
    name="text-offensive",
    num_classes=2,
    models={"ngram": NgramClassifier},
    load_data=read_csv,
    train=train_adamw,
    training_extra=TrainingExtra,
    example_data=example_examples,
)
