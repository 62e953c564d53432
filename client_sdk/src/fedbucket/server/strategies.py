"""Aggregation strategies: pure math on float64 numpy slices, one class per strategy.

A round's candidate is computed slice by slice (a slice is a contiguous range of one tensor's
elements, the same range in every update), so each strategy sees, for one slice:

- ``base``: the round's base model values, shape ``(k,)``;
- the clients' deltas, stacked in client-id order, shape ``(n, k)``, already scaled by the
  norm-bounding factor when ``clip_norm`` is set;
- ``weights``: the clients' example counts, shape ``(n,)``;
- ``state``: the server-optimiser state for that slice (empty for stateless strategies).

and returns the new values and the new state. Server state is data, not attributes: it lives in
the bucket between rounds (``state/<round>/strategy.safetensors``) and is passed in and out, because
each round is a separate DAG run and Spark job.

Norm bounding (``clip_norm``, Sun et al. 2019, "Can You Really Backdoor Federated Learning?",
arXiv:1911.07963) works with every strategy: each client's delta is scaled by
``min(1, clip_norm / ||delta||)`` with the L2 norm taken over all its floating-point tensors.

Integer tensors (buffers such as BatchNorm's ``num_batches_tracked``) are not parameters: every
strategy gives them ``base + round_half_even(example-weighted mean of the deltas)``, computed in
exact integer arithmetic (:func:`integer_mean_step`), with no clipping and no server optimiser.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from fedbucket.protocol.errors import ConfigError

State = dict[str, np.ndarray]


class Strategy:
    """Base class: the weighted mean of the deltas, applied with a server learning rate.

    Args:
        server_learning_rate: step size on the aggregated delta (1.0 = plain averaging).
        clip_norm: if set, scale every client's delta to at most this L2 norm first.
    """

    name: ClassVar[str] = ""
    state_names: ClassVar[tuple[str, ...]] = ()
    #: Robust strategies need every client's slice at once; mean-based ones stream.
    needs_all_deltas: ClassVar[bool] = False

    def __init__(self, *, server_learning_rate: float = 1.0, clip_norm: float | None = None) -> None:
        if server_learning_rate <= 0:
            raise ValueError("server_learning_rate must be positive")
        if clip_norm is not None and clip_norm <= 0:
            raise ValueError("clip_norm must be positive (or None to disable norm bounding)")
        self.server_learning_rate = server_learning_rate
        self.clip_norm = clip_norm

    # -- configuration --------------------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        """The constructor arguments, for manifests and reports."""
        return {"server_learning_rate": self.server_learning_rate, "clip_norm": self.clip_norm}

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items() if v is not None)
        return f"{self.name}({opts})"

    # -- per client -----------------------------------------------------------------------------

    def check_clients(self, clients: int) -> None:
        """Raise :class:`ConfigError` if this strategy cannot combine ``clients`` updates (checked
        on the driver before any work is spread out, so it fails once, as a usage error)."""

    def client_scale(self, l2_norm: float) -> float:
        """Norm-bounding factor for a client whose delta has norm ``l2_norm``."""
        if self.clip_norm is None or l2_norm <= self.clip_norm:
            return 1.0
        return self.clip_norm / l2_norm

    # -- per slice ------------------------------------------------------------------------------

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The aggregated delta of one slice: here the example-weighted mean (``weights`` sum to 1)."""
        out = np.zeros(deltas.shape[1], dtype=np.float64)
        for row, weight in zip(deltas, weights, strict=True):  # fixed client order: deterministic
            self.accumulate(out, row, weight)
        return out

    @staticmethod
    def accumulate(out: np.ndarray, row: np.ndarray, weight: float, scratch: np.ndarray | None = None) -> None:
        """``out += weight * row`` in float64: the streaming form of :meth:`combine` for mean-based
        strategies (same operations in the same order, so streaming and stacked give identical
        bits). ``row`` may be float32; ``scratch`` (float64, ``row``'s size) avoids a temporary."""
        product = np.multiply(row, weight, out=scratch, dtype=np.float64)
        out += product

    def init_state(self, size: int) -> State:
        return {}

    def step(self, base: np.ndarray, delta: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """Apply the aggregated delta to the base values of one slice."""
        return base + self.server_learning_rate * delta, state


class FedAvg(Strategy):
    """Federated Averaging: the example-weighted mean of the client deltas.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017, arXiv:1602.05629. With ``server_learning_rate=1`` the candidate is
    ``base + sum_i (n_i / n) * delta_i``.
    """

    name = "fedavg"


class FedAvgM(Strategy):
    """FedAvg with server momentum: ``v = momentum * v + delta; x = x + lr * v``.

    Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
    Visual Classification", 2019, arXiv:1909.06335. ``momentum=0`` reduces to FedAvg.
    """

    name = "fedavgm"
    state_names = ("momentum",)

    def __init__(self, *, momentum: float = 0.9, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 <= momentum < 1:
            raise ValueError("momentum must be in [0, 1)")
        self.momentum = momentum

    def options(self) -> dict[str, Any]:
        return super().options() | {"momentum": self.momentum}

    def init_state(self, size: int) -> State:
        return {"momentum": np.zeros(size)}

    def step(self, base: np.ndarray, delta: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        velocity = self.momentum * state["momentum"] + delta
        return base + self.server_learning_rate * velocity, {"momentum": velocity}


class _AdaptiveServerOptimiser(Strategy):
    """Shared part of FedAdagrad, FedAdam and FedYogi (Reddi et al. 2021, Algorithm 2).

    The aggregated delta is a pseudo-gradient: ``m = beta1 * m + (1 - beta1) * delta``, the second
    moment ``v`` is updated by the subclass, and ``x = x + lr * m / (sqrt(v) + tau)``. As in the
    paper there is no bias correction, and ``v`` starts at ``tau**2``.
    """

    state_names = ("m", "v")

    def __init__(
        self,
        *,
        server_learning_rate: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        clip_norm: float | None = None,
    ) -> None:
        super().__init__(server_learning_rate=server_learning_rate, clip_norm=clip_norm)
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        if tau <= 0:
            raise ValueError("tau (adaptivity) must be positive")
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    def options(self) -> dict[str, Any]:
        return super().options() | {"beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def init_state(self, size: int) -> State:
        return {"m": np.zeros(size), "v": np.full(size, self.tau**2)}

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step(self, base: np.ndarray, delta: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        m = self.beta1 * state["m"] + (1 - self.beta1) * delta
        v = self.second_moment(state["v"], delta)
        return base + self.server_learning_rate * m / (np.sqrt(v) + self.tau), {"m": m, "v": v}


class FedAdagrad(_AdaptiveServerOptimiser):
    """Adagrad on the server: ``v = v + delta**2``.

    Reddi et al., "Adaptive Federated Optimization", ICLR 2021, arXiv:2003.00295.
    """

    name = "fedadagrad"

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v + delta**2


class FedAdam(_AdaptiveServerOptimiser):
    """Adam on the server: ``v = beta2 * v + (1 - beta2) * delta**2``.

    Reddi et al., "Adaptive Federated Optimization", ICLR 2021, arXiv:2003.00295.
    """

    name = "fedadam"

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * delta**2


class FedYogi(_AdaptiveServerOptimiser):
    """Yogi on the server: ``v = v - (1 - beta2) * delta**2 * sign(v - delta**2)``.

    Reddi et al., "Adaptive Federated Optimization", ICLR 2021, arXiv:2003.00295 (Yogi: Zaheer et
    al., NeurIPS 2018). Its additive update keeps ``v`` from growing as fast as Adam's.
    """

    name = "fedyogi"

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        squared = delta**2
        return v - (1 - self.beta2) * squared * np.sign(v - squared)


class FedMedian(Strategy):
    """Coordinate-wise median of the deltas (unweighted).

    Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
    ICML 2018, arXiv:1803.01498. Tolerates fewer than half the clients sending arbitrary values.
    """

    name = "fedmedian"
    needs_all_deltas = True

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return np.median(deltas, axis=0)


class FedTrimmedAvg(Strategy):
    """Coordinate-wise trimmed mean (unweighted): per coordinate, drop the ``beta`` fraction of
    largest and of smallest values, average the rest.

    Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
    ICML 2018, arXiv:1803.01498. ``beta`` must leave at least one value: ``2 * floor(beta * n) < n``.
    """

    name = "fedtrimmedavg"
    needs_all_deltas = True

    def __init__(self, *, beta: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 <= beta < 0.5:
            raise ValueError("beta is the fraction trimmed from each end: it must be in [0, 0.5)")
        self.beta = beta

    def options(self) -> dict[str, Any]:
        return super().options() | {"beta": self.beta}

    def check_clients(self, clients: int) -> None:
        if 2 * math.floor(self.beta * clients) >= clients:
            raise ConfigError(f"beta={self.beta} is too large for {clients} clients: nothing would be left to average")

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        n = deltas.shape[0]
        self.check_clients(n)
        cut = math.floor(self.beta * n)
        ordered = np.sort(deltas, axis=0)
        return ordered[cut : n - cut].mean(axis=0)


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi, FedMedian, FedTrimmedAvg)
}


def build_strategy(name: str, options: dict[str, Any] | None = None) -> Strategy:
    """Instantiate a strategy by name (``fedavg``, ``fedavgm``, ``fedadagrad``, ``fedadam``,
    ``fedyogi``, ``fedmedian``, ``fedtrimmedavg``) with keyword options.

    Raises :class:`ConfigError` for an unknown strategy, an option it does not take (its
    constructor's keywords are its schema), a value that is not a number, or an out-of-range one.
    """
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None
    options = dict(options or {})
    accepted = _keywords(cls)
    if unknown := sorted(set(options) - accepted):
        raise ConfigError(f"strategy {name!r} takes no option(s) {unknown}; it takes {sorted(accepted)}")
    for key, value in options.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigError(f"strategy {name!r}: option {key} must be a number, got {value!r}")
    try:
        return cls(**options)
    except ValueError as exc:
        raise ConfigError(f"strategy {name!r}: {exc}") from None


def _keywords(cls: type[Strategy]) -> set[str]:
    """The keyword options a strategy's constructor (and its bases', through ``**kwargs``) takes."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names |= {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            break
    return names


def integer_mean_step(base: np.ndarray, deltas: np.ndarray, examples: Sequence[int]) -> np.ndarray:
    """The rule for integer tensors: ``base + round_half_even(sum_i n_i * delta_i / sum_i n_i)``,
    computed in exact integer arithmetic (Python ints), so ties round the documented way and
    int64 values beyond 2**53 survive. ``deltas``: int64, shape ``(clients, k)``; ``examples``: the
    clients' (capped) example counts. The result is int64, saturated at its range."""
    total = sum(int(n) for n in examples)
    numerator = np.zeros(deltas.shape[1], dtype=object)
    for row, n in zip(deltas, examples, strict=True):  # object arrays: arbitrary precision
        numerator = numerator + row.astype(object) * int(n)
    quotient, remainder = numerator // total, numerator % total  # floor division: 0 <= remainder < total
    twice = remainder * 2
    round_up = (twice > total) | ((twice == total) & (quotient % 2 == 1))
    mean = quotient + round_up.astype(object)
    limits = np.iinfo(np.int64)  # saturate: hostile integer deltas must not wrap or crash the job
    return np.array(np.clip(base.astype(object) + mean, limits.min, limits.max), dtype=np.int64)
