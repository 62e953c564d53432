"""The centrally trained baseline a federation of this task is compared with: the same model and
recipe trained on all the data in one place, scored on a held-out 20 %.

    python -m fedbucket_textclf.central --rows 4000 --epochs 3 --seed 0 [--csv messages.csv]

Prints one JSON object (test accuracy, macro-F1, loss, the majority-class baseline, seconds).
Metrics come from :meth:`Task.score` counts, computed the way fedbucket's gate computes them, so
the numbers compare with a federation's reports.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fedbucket.protocol.documents import ModelScore, ModelSpec, TrainingConfig
from fedbucket.torch.task import Examples
from fedbucket_textclf.data import examples_from_rows, generate_corpus, read_csv
from fedbucket_textclf.task import TASK

#: The reference the federation config names; the central run builds its model the same way.
TASK_REFERENCE = "fedbucket_textclf.task:TASK"
#: Hyper-parameters of the baseline (``local_epochs`` is replaced by ``epochs``). AdamW at 0.01
#: with mini-batches of 32 converges in 2-3 passes over a few thousand messages.
CENTRAL_TRAINING = TrainingConfig(batch_size=32, learning_rate=0.01, extra={"optimizer": "adamw"})


def macro_f1(score: ModelScore) -> float:
    """Mean over classes with support (``tp + fn > 0``) of ``2 tp / (2 tp + fp + fn)``."""
    f1s = [
        2 * tp / (2 * tp + fp + fn)
        for tp, fp, fn in zip(score.true_positive, score.false_positive, score.false_negative, strict=True)
        if tp + fn > 0
    ]
    return float(np.mean(f1s)) if f1s else 0.0


def summarise(score: ModelScore) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of a :class:`ModelScore`."""
    n = max(score.examples, 1)
    return {
        "loss": score.loss_sum / n,
        "accuracy": sum(score.true_positive) / n,
        "macro_f1": macro_f1(score),
    }


def train_central(
    examples_train: Examples,
    examples_test: Examples,
    epochs: int = 3,
    seed: int = 0,
    training: TrainingConfig = CENTRAL_TRAINING,
    model_kwargs: dict[str, int] | None = None,
) -> dict[str, float | int]:
    """Train a fresh ``ngram`` model (weights from ``seed``) on ``examples_train`` for ``epochs``
    passes with ``training``'s other settings; returns the test metrics, the training metrics
    (``train_*``), the test metrics of the untrained model and the majority-class baseline."""
    training = TrainingConfig.model_validate({**training.model_dump(), "local_epochs": epochs})
    spec = ModelSpec(task=TASK_REFERENCE, name="ngram", kwargs=model_kwargs or {})
    model = TASK.build_model(spec, seed=seed)
    untrained = summarise(TASK.score(model, examples_test))
    started = time.perf_counter()
    fitted = TASK.fit(model, examples_train, training, seed=seed)
    seconds = time.perf_counter() - started
    test = summarise(TASK.score(model, examples_test))
    majority = int(np.bincount(examples_train.y, minlength=TASK.num_classes).argmax())
    return {
        "train_examples": len(examples_train),
        "test_examples": len(examples_test),
        "epochs": epochs,
        "seed": seed,
        "accuracy": test["accuracy"],
        "macro_f1": test["macro_f1"],
        "loss": test["loss"],
        "train_accuracy": fitted["accuracy"],
        "train_loss": fitted["loss"],
        "untrained_accuracy": untrained["accuracy"],
        "majority_accuracy": float(np.mean(examples_test.y == majority)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000, help="messages to generate (ignored with --csv)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training 80%%")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus, the split and the model")
    parser.add_argument("--csv", help="train on this CSV (text,label) instead of a generated corpus")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    examples = read_csv(args.csv) if args.csv else examples_from_rows(generate_corpus(args.rows, args.seed))
    rest, held_out = examples.split(0.2, seed=args.seed)
    result = train_central(rest, held_out, epochs=args.epochs, seed=args.seed)
    result["total_seconds"] = time.perf_counter() - started
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}, indent=2))


if __name__ == "__main__":
    main()
