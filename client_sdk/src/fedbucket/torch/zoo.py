"""A tiny model zoo for 8x8 digits, referenced by name in a federation's config.

``build_model(ModelSpec(name="mlp", kwargs={"hidden": 64}))``; a name of the form
``package.module:callable`` builds a model of your own (the callable gets the kwargs).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedbucket.protocol.documents import ModelSpec
from fedbucket.protocol.errors import ConfigError

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


def build_model(spec: ModelSpec, *, seed: int | None = None) -> torch.nn.Module:
    """Instantiate ``spec`` (weights initialised from ``seed`` when given)."""
    import torch

    if spec.name in ZOO:
        factory = ZOO[spec.name]
    elif ":" in spec.name:
        module_name, _, attr = spec.name.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
    else:
        raise ConfigError(f"unknown model {spec.name!r}: use one of {sorted(ZOO)} or 'package.module:callable'")
    if seed is not None:
        torch.manual_seed(seed)
    return factory(**spec.kwargs)
