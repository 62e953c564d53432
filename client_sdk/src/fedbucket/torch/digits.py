"""The built-in task: scikit-learn's 8x8 digits (shipped with scikit-learn, no download) and the
small model zoo of :mod:`fedbucket.torch.zoo`. A federation whose ``model.task`` is unset uses it.

Local data for :func:`load_digits_file` is a safetensors file of ``x`` (n, 64) float32 pixels in
[0, 1] and ``y`` (n,) int64 digits; the simulation deals out :func:`digits` instead.
"""

from __future__ import annotations

import numpy as np

from fedbucket.protocol.tensors import load_tensors
from fedbucket.torch.task import Examples, Task, examples_from
from fedbucket.torch.zoo import ZOO


def all_digits(seed: int = 0) -> Examples:
    """All 1,797 digits (``seed`` is unused: the data is fixed)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return Examples((data.data / 16.0).astype(np.float32), data.target.astype(np.int64))


def digits(*, holdout_fraction: float = 0.2, seed: int = 0) -> tuple[Examples, Examples]:
    """``(train, holdout)``: the split :func:`~fedbucket.torch.task.example_split` makes, so the
    clients' pool and the server's validation and test halves never overlap."""
    return all_digits().split(holdout_fraction, seed=seed)


def load_digits_file(source: str) -> Examples:
    """A client's digits: a safetensors file with ``x`` and ``y``."""
    return examples_from(load_tensors(source))


TASK = Task(
    name="digits",
    num_classes=10,
    models=ZOO,
    load_data=load_digits_file,
    example_data=all_digits,
)
