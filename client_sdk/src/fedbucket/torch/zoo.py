"""A tiny model zoo for 8x8 digits: the models of the built-in digits task
(:mod:`fedbucket.torch.digits`), referenced by name in a federation's config
(``model = { name = "mlp", kwargs = { hidden = 64 } }``). A model of your own comes in a task
package (:mod:`fedbucket.torch.task`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def mlp(hidden: int = 64, num_classes: int = 10, in_features: int = 64) -> torch.nn.Module:
    """Two-layer perceptron over the 64 pixels of an 8x8 digit."""
    from torch import nn

    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def cnn(channels: int = 16, num_classes: int = 10) -> torch.nn.Module:
    """A small CNN for 1x8x8 digits: two 3x3 convolutions (the second with BatchNorm), a pool, a head."""
    from torch import nn

    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.BatchNorm2d(2 * channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * 4 * 4, num_classes),
    )


ZOO: dict[str, Callable[..., Any]] = {"mlp": mlp, "cnn": cnn}
