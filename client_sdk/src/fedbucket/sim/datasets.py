"""The data of the simulated federation: scikit-learn's 8x8 digits (shipped with the package, no
download), a fixed train/hold-out split, and IID or Dirichlet(alpha) non-IID client partitions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedbucket.protocol.errors import ConfigError

Partition = Literal["iid", "dirichlet"]


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32, (n, 64), pixel values scaled to [0, 1]
    y: np.ndarray  # int64, (n,)


def digits(*, holdout_fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """``(train, holdout)``: a stratified split of the 1,797 digits, the same for a given seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_tr, x_ho, y_tr, y_ho = train_test_split(x, y, test_size=holdout_fraction, random_state=seed, stratify=y)
    return Split(x_tr, y_tr), Split(x_ho, y_ho)


def digits_holdout(seed: int = 0, holdout_fraction: float = 0.2) -> dict[str, np.ndarray]:
    """The digits hold-out split as the ``{"x", "y"}`` state dict ``fedbucket init`` publishes."""
    _, split = digits(holdout_fraction=holdout_fraction, seed=seed)
    return {"x": split.x, "y": split.y}


def partition(
    labels: np.ndarray,
    num_clients: int,
    *,
    scheme: Partition = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_examples: int = 10,
) -> list[np.ndarray]:
    """Split example indices among clients.

    ``iid``: a shuffled even split. ``dirichlet``: for every class, the class's examples are dealt
    to clients in proportions drawn from Dirichlet(alpha) (Hsu et al., 2019, arXiv:1909.06335);
    small alpha gives each client few classes. Redrawn (same seed stream) until every client has
    at least ``min_examples``.
    """
    if num_clients < 1:
        raise ConfigError("num_clients must be at least 1")
    if num_clients * min_examples > len(labels):
        raise ConfigError(f"{len(labels)} examples cannot give {num_clients} clients {min_examples} each")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]
    if scheme != "dirichlet":
        raise ConfigError(f"unknown partition scheme {scheme!r}: use 'iid' or 'dirichlet'")
    if alpha <= 0:
        raise ConfigError("alpha must be positive")
    for _ in range(1000):
        shares: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)[:-1]
            for client, part in enumerate(np.split(idx, cuts)):
                shares[client].extend(part.tolist())
        if min(len(s) for s in shares) >= min_examples:
            return [np.sort(np.array(s, dtype=np.int64)) for s in shares]
    raise ConfigError(f"could not give every client {min_examples} examples with alpha={alpha}; raise alpha")
