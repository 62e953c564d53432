"""Local (record-level) differential privacy on the client: DP-SGD through Opacus.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", arXiv:1607.00133) clips
every example's gradient to ``max_grad_norm`` and adds Gaussian noise of std
``noise_multiplier * max_grad_norm`` to each batch's summed gradient, with Poisson-sampled
batches. Opacus (``fedbucket[dp]``) computes the per-example gradients and keeps the accountant.

Invariants:

- The client's epsilon is over *its own records* and every round it trained with DP-SGD: the
  accountant's history (noise multiplier, sample rate, steps per round) persists in a small JSON
  file, so a restarted client keeps counting. Before a round, the epsilon it would reach is
  computed; past the local budget the client refuses to train (:class:`PrivacyBudgetExceeded`).
- Batch sampling and noise come from a torch generator seeded from the OS's CSPRNG each round
  (``secrets``), never torch's fixed default seed nor the round's public seed: an observer of the
  update must not be able to regenerate the noise.
- Models with layers Opacus cannot train privately (BatchNorm mixes examples) are refused with a
  clear message before any training.
"""

from __future__ import annotations

import json
import math
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fedbucket.protocol.documents import TrainingConfig
from fedbucket.protocol.errors import ConfigError, PrivacyBudgetExceeded
from fedbucket.torch.task import Examples, default_forward
from fedbucket.torch.training import evaluate

#: One DP-SGD training run as Opacus's RDP accountant records it: (noise multiplier, sample rate, steps).
Step = tuple[float, float, int]


@dataclass(frozen=True)
class DPSGDSettings:
    """What a client chooses for its records: noise, clipping and a local (epsilon, delta) budget."""

    noise_multiplier: float
    max_grad_norm: float
    epsilon_budget: float
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.noise_multiplier <= 0 or self.max_grad_norm <= 0 or self.epsilon_budget <= 0:
            raise ConfigError("DP-SGD needs a positive noise multiplier, clip norm and epsilon budget")
        if not 0 < self.delta < 1:
            raise ConfigError("DP-SGD delta must be in (0, 1)")


def _epsilon(history: list[Step], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta)) if history else 0.0


@dataclass
class LocalPrivacy:
    """A client's DP-SGD trainer and accountant across rounds (state in ``state_path``, if given)."""

    settings: DPSGDSettings
    state_path: Path | None = None
    history: list[Step] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.state_path is not None and self.state_path.exists():
            try:
                saved = json.loads(self.state_path.read_text())
                self.history = [(float(z), float(q), int(n)) for z, q, n in saved["history"]]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{self.state_path}: not a DP-SGD state file ({exc}); refusing to reset it") from None

    @property
    def epsilon(self) -> float:
        """This client's epsilon at ``settings.delta`` over every round it trained so far."""
        return _epsilon(self.history, self.settings.delta)

    def planned(self, examples: int, training: TrainingConfig) -> Step:
        """The accountant's record of one round of ``training`` on ``examples`` records, as Opacus
        1.6 makes it: its Poisson loader samples each record with ``q0 = 1 / ceil(examples /
        batch_size)`` for ``steps = int(1 / q0)`` steps per epoch, and the accountant records the
        rate ``1 / steps`` (>= q0: a slight over-charge)."""
        steps = int(1 / (1 / math.ceil(examples / training.batch_size)))
        return (self.settings.noise_multiplier, 1 / steps, training.local_epochs * steps)

    def check_budget(self, examples: int, training: TrainingConfig) -> float:
        """The epsilon this round would bring; :class:`PrivacyBudgetExceeded` past the budget."""
        after = _epsilon([*self.history, self.planned(examples, training)], self.settings.delta)
        if after > self.settings.epsilon_budget:
            raise PrivacyBudgetExceeded(
                f"DP-SGD: this round would take the local epsilon from {self.epsilon:.3f} to {after:.3f} at delta "
                f"{self.settings.delta:g}, past the local budget of {self.settings.epsilon_budget:g} by "
                f"{after - self.settings.epsilon_budget:.3f}; this client stops training (raise --dp-sgd-noise "
                "for future federations, or stop: the budget is what was promised for these records)"
            )
        return after

    def fit(
        self,
        model: nn.Module,
        examples: Examples,
        training: TrainingConfig,
        *,
        forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """Train ``model`` in place with DP-SGD (SGD, momentum 0.9, the round's learning rate, epochs
        and batch size); returns loss, accuracy and ``dp_sgd_epsilon`` (after this round)."""
        from opacus import PrivacyEngine
        from opacus.validators import ModuleValidator

        model.train()
        problems = ModuleValidator.validate(model, strict=False)
        if problems:
            raise ConfigError(
                f"DP-SGD cannot train this model: {problems[0]} (Opacus needs per-example gradients; BatchNorm "
                "mixes examples — use a model without it, e.g. mlp)"
            )
        self.check_budget(len(examples), training)
        forward = forward or default_forward
        generator = torch.Generator().manual_seed(secrets.randbits(63))  # secret: batches and noise
        dataset = torch.utils.data.TensorDataset(torch.from_numpy(examples.x), torch.from_numpy(examples.y))
        loader = torch.utils.data.DataLoader(dataset, batch_size=training.batch_size, generator=generator)
        optimiser = torch.optim.SGD(model.parameters(), lr=training.learning_rate, momentum=0.9)
        with warnings.catch_warnings():
            # Opacus warns that secure_mode (torchcsprng, unmaintained for current torch) is off; the
            # generator above is seeded from the OS CSPRNG instead: docs/privacy.md says what that means.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant="rdp")
        private_model, private_optimiser, private_loader = engine.make_private(
            module=model,
            optimizer=optimiser,
            data_loader=loader,
            noise_multiplier=self.settings.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            noise_generator=generator,
        )
        loss_fn = nn.CrossEntropyLoss()
        private_model.train()
        try:
            for _ in range(training.local_epochs):
                for x, y in private_loader:  # an empty Poisson batch still steps: Opacus adds the noise
                    private_optimiser.zero_grad()
                    loss_fn(forward(private_model, x), y).backward()
                    private_optimiser.step()
        finally:
            private_optimiser.zero_grad(set_to_none=True)  # drop per-sample and summed gradients
            private_model._close()  # remove Opacus's hooks: ``model`` is a plain module again
        self.history.extend(engine.accountant.history)
        self._save()
        return evaluate(model, examples, forward=forward) | {"dp_sgd_epsilon": self.epsilon}

    def _save(self) -> None:
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"delta": self.settings.delta, "history": self.history}))
        temporary.replace(self.state_path)
