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


def digits(*, holdout_fraction: float = 0.2, seed: int = 0) -> tuple[Examples, Examples]:
    """``(train, holdout)``: a stratified split of the 1,797 digits, the same for a given seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_tr, x_ho, y_tr, y_ho = train_test_split(x, y, test_size=holdout_fraction, random_state=seed, stratify=y)
    return Examples(x_tr, y_tr), Examples(x_ho, y_ho)


def load_digits_file(source: str) -> Examples:
    """A client's digits: a safetensors file with ``x`` and ``y``."""
    return examples_from(load_tensors(source))


TASK = Task(
    name="digits",
    num_classes=10,
    models=ZOO,
    load_data=load_digits_file,
    example_data=lambda seed: digits(seed=seed)[0],
)
