"""PyTorch helpers: start from the global weights, train locally, optional FedProx term.

FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
arXiv:1812.06127) adds ``mu/2 * ||w - w_global||^2`` to the local loss so that clients with
non-IID data drift less from the global model; ``mu = 0`` is plain FedAvg local training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedbucket.protocol.documents import TrainingConfig
from fedbucket.torch.task import default_forward

if TYPE_CHECKING:
    from fedbucket.torch.task import Examples


def load_global_weights(model: nn.Module, state: Mapping[str, Any]) -> nn.Module:
    """Load a fetched state dict (torch tensors or numpy arrays) into ``model``; strict names."""
    tensors = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v)) for k, v in state.items()}
    model.load_state_dict(tensors, strict=True)
    return model


class ProximalTerm:
    """``mu/2 * ||w - w0||^2`` with ``w0`` the weights at construction (FedProx)."""

    def __init__(self, model: nn.Module, mu: float) -> None:
        self.mu = mu
        self._anchor = [p.detach().clone() for p in model.parameters()]
        self._model = model

    def __call__(self) -> torch.Tensor:
        if self.mu == 0:
            return torch.zeros(())
        total = sum(((p - a) ** 2).sum() for p, a in zip(self._model.parameters(), self._anchor, strict=True))
        return 0.5 * self.mu * total


def train_local(
    model: nn.Module,
    examples: Examples,
    training: TrainingConfig,
    *,
    seed: int = 0,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """The default training recipe: SGD with momentum 0.9 for ``training.local_epochs`` (plus the
    FedProx term); trains ``model`` in place and returns its loss and accuracy on ``examples``.

    A task with its own recipe (another optimiser, its ``training.extra`` options) passes its own
    function with this signature as ``Task.train``.
    """
    optimiser = torch.optim.SGD(model.parameters(), lr=training.learning_rate, momentum=0.9)
    return run_epochs(model, examples, training, optimiser, nn.CrossEntropyLoss(), seed=seed, forward=forward)


def run_epochs(
    model: nn.Module,
    examples: Examples,
    training: TrainingConfig,
    optimiser: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    seed: int = 0,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """The local training loop every recipe shares: ``training.local_epochs`` seeded shuffles in
    mini-batches of ``training.batch_size``, ``loss_fn`` plus the FedProx term (anchored at the
    weights the round started from), one ``optimiser`` step per batch. A task's own recipe picks
    the optimiser and the loss and calls this. Returns loss and accuracy on ``examples``."""
    forward = forward or default_forward
    generator = torch.Generator().manual_seed(seed)
    xs, ys = torch.from_numpy(examples.x), torch.from_numpy(examples.y)
    proximal = ProximalTerm(model, training.proximal_mu)
    model.train()
    for _ in range(training.local_epochs):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), training.batch_size):
            batch = order[start : start + training.batch_size]
            optimiser.zero_grad()
            loss = loss_fn(forward(model, xs[batch]), ys[batch]) + proximal()
            loss.backward()
            optimiser.step()
    return evaluate(model, examples, forward=forward)


@torch.no_grad()
def evaluate(
    model: nn.Module, examples: Examples, *, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``examples``."""
    model.eval()
    logits = (forward or default_forward)(model, torch.from_numpy(examples.x))
    labels = torch.from_numpy(examples.y)
    loss = nn.functional.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    return {"loss": float(loss), "accuracy": float(accuracy)}


def state_dict_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """``model.state_dict()`` as numpy arrays (copies), ready for :func:`fedbucket.save_tensors`."""
    return {name: value.detach().cpu().numpy().copy() for name, value in model.state_dict().items()}
