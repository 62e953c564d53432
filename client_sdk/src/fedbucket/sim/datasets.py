"""How the simulated federation deals examples out: IID or Dirichlet(alpha) non-IID client
partitions of any task's labels (the digits themselves live in :mod:`fedbucket.torch.digits`)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from fedbucket.protocol.errors import ConfigError

Partition = Literal["iid", "dirichlet"]


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
