"""A simulated federation: N client processes that really train on digits and submit updates.

Each client is a separate OS process with its own :class:`~fedbucket.Client`, its own partition of
the digits training set and a role:

- ``honest``: waits for a round, trains (PyTorch, the round's hyper-parameters), submits;
- ``dropout``: fetches the round's model, then never answers (a silent client);
- ``straggler``: trains, then submits only after the deadline (the server must call it late);
- ``hostile``: sends a malformed or poisoned update, a different attack each round (wrong shapes,
  NaN, huge values, a pickle renamed to .safetensors, a truncated file), bypassing the SDK's own
  checks the way a real attacker would.

Roles are assigned deterministically from the end of the client list: the last ``hostile``
clients, then ``stragglers``, then ``round(dropout * clients)`` dropouts; the rest are honest.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import pickle
import queue
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from fedbucket.protocol.documents import RoundTask, UpdateManifest, utcnow
from fedbucket.protocol.errors import ConfigError, WaitTimeout
from fedbucket.protocol.layout import LAYOUT
from fedbucket.protocol.tensors import NUMPY_DTYPES, tensors_to_bytes
from fedbucket.sim.datasets import Partition, digits, partition

Role = Literal["honest", "dropout", "straggler", "hostile"]
ATTACKS = ("wrong_shape", "nan", "huge_values", "pickle", "truncated")


@dataclass(frozen=True)
class SimulationConfig:
    bucket_url: str
    clients: int = 10
    rounds: int = 1
    partition: Partition = "dirichlet"
    alpha: float = 0.5
    seed: int = 0
    dropout: float = 0.0
    stragglers: int = 0
    hostile: int = 0
    poll_interval: float = 0.5
    round_timeout: float = 600.0
    cache_dir: str | None = None
    client_prefix: str = "client"

    def client_ids(self) -> list[str]:
        return [f"{self.client_prefix}-{i:02d}" for i in range(self.clients)]

    def roles(self) -> dict[str, Role]:
        ids = self.client_ids()
        dropouts = round(self.dropout * self.clients)
        if self.hostile + self.stragglers + dropouts > self.clients:
            raise ConfigError("hostile + stragglers + dropouts exceed the number of clients")
        roles: dict[str, Role] = dict.fromkeys(ids, "honest")
        special: list[Role] = ["hostile"] * self.hostile + ["straggler"] * self.stragglers + ["dropout"] * dropouts
        for client_id, role in zip(reversed(ids), special, strict=False):
            roles[client_id] = role
        return roles


@dataclass
class ClientRoundResult:
    client_id: str
    round_id: str
    role: str
    outcome: str  # submitted | late | dropped | hostile:<attack> | error
    num_examples: int = 0
    loss: float | None = None
    accuracy: float | None = None
    detail: str = ""

    def line(self) -> str:
        trained = f"trained on {self.num_examples:4d} examples" if self.num_examples else " " * 25
        metrics = f"loss {self.loss:.3f} acc {self.accuracy:.3f}" if self.loss is not None else " " * 20
        extra = f"  ({self.detail})" if self.detail else ""
        return f"[round {self.round_id}] {self.client_id:12s} {trained}  {metrics}  {self.outcome}{extra}"


@dataclass(frozen=True)
class ClientReady:
    """A client process has started (torch imported, data loaded) and waits for rounds."""

    client_id: str


@dataclass
class SimulationSummary:
    results: list[ClientRoundResult] = field(default_factory=list)

    def counts(self) -> Counter[str]:
        return Counter(r.outcome.split(":")[0] for r in self.results)

    def text(self) -> str:
        rounds = sorted({r.round_id for r in self.results})
        counts = self.counts()
        parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        return f"simulation: {len(rounds)} round(s), {len({r.client_id for r in self.results})} clients: {parts}"


def _hostile_payload(attack: str, task: RoundTask, rng: np.random.Generator) -> bytes:
    def tensors(fill: Callable[[tuple[int, ...], np.dtype], np.ndarray]) -> dict[str, np.ndarray]:
        return {n: fill(tuple(s.shape), NUMPY_DTYPES[s.dtype]) for n, s in task.tensors.items()}

    if attack == "wrong_shape":
        return tensors_to_bytes(tensors(lambda shape, dt: np.zeros(tuple(d + 1 for d in shape), dt)))
    if attack == "nan":
        return tensors_to_bytes(tensors(lambda shape, dt: np.full(shape, np.nan if dt.kind == "f" else 0, dt)))
    if attack == "huge_values":
        return tensors_to_bytes(tensors(lambda shape, dt: np.full(shape, 1e30 if dt.kind == "f" else 0, dt)))
    if attack == "pickle":
        return pickle.dumps({n: rng.standard_normal(3) for n in task.tensors})
    if attack == "truncated":
        full = tensors_to_bytes(tensors(lambda shape, dt: np.zeros(shape, dt)))
        return full[: len(full) // 2]
    raise ValueError(attack)


def _write_raw_update(store, task: RoundTask, client_id: str, payload: bytes, num_examples: int) -> None:  # noqa: ANN001
    """Commit an update without any client-side check, as an attacker would."""
    sha = hashlib.sha256(payload).hexdigest()
    store.put_bytes(LAYOUT.update_payload(client_id, task.round_id, sha), payload)
    manifest = UpdateManifest(
        client_id=client_id,
        round_id=task.round_id,
        base_model_version=task.base_model_version,
        num_examples=num_examples,
        sha256=sha,
        size_bytes=len(payload),
        created_at=utcnow(),
    )
    store.put_bytes(LAYOUT.update_manifest(client_id, task.round_id), manifest.to_json_bytes())


def run_client(config: SimulationConfig, client_id: str, role: Role, indices: np.ndarray, results: mp.Queue) -> None:
    """One simulated client process: take part in ``config.rounds`` rounds, report each."""

    import torch

    from fedbucket.client import Client, compute_delta, upload_update
    from fedbucket.protocol.tensors import save_tensors
    from fedbucket.torch.training import load_global_weights, train_local
    from fedbucket.torch.zoo import build_model

    torch.set_num_threads(1)
    train, _ = digits(seed=config.seed)
    x, y = train.x[indices], train.y[indices]
    client_number = config.client_ids().index(client_id)
    rng = np.random.default_rng([config.seed, client_number])
    last_round: str | None = None
    with Client(config.bucket_url, client_id, cache_dir=config.cache_dir) as client:
        results.put(ClientReady(client_id))  # torch imported, data loaded: waiting for rounds from here
        for round_index in range(config.rounds):
            try:
                task = client.wait_for_round(
                    timeout=config.round_timeout, poll_interval=config.poll_interval, after=last_round
                )
            except WaitTimeout:
                results.put(ClientRoundResult(client_id, "-", role, "error", detail="no round opened in time"))
                return
            last_round = task.round_id
            result = ClientRoundResult(client_id, task.round_id, role, "submitted")
            try:
                if role == "hostile":
                    attack = ATTACKS[(round_index + client_number) % len(ATTACKS)]
                    _write_raw_update(client.store, task, client_id, _hostile_payload(attack, task, rng), len(y))
                    result.outcome = f"hostile:{attack}"
                else:
                    model = build_model(task.model)
                    load_global_weights(model, client.fetch_model(task))
                    if role == "dropout":
                        result.outcome = "dropped"
                    else:
                        metrics = train_local(model, x, y, task.training, seed=int(rng.integers(2**31)))
                        result.num_examples, result.loss, result.accuracy = len(y), metrics["loss"], metrics["accuracy"]
                        if role == "straggler":
                            time.sleep(max(0.0, (task.deadline - utcnow()).total_seconds()) + 1.0)
                            base = client.fetch_model(task, as_numpy=True)
                            with tempfile.TemporaryDirectory() as tmp:
                                path = Path(tmp) / "late.safetensors"
                                save_tensors(compute_delta(model.state_dict(), base), path)
                                upload_update(
                                    client.store, task, client_id, path, num_examples=len(y), check_deadline=False
                                )
                            result.outcome = "late"
                        else:
                            client.submit(task, model.state_dict(), num_examples=len(y), metrics=metrics)
            except Exception as exc:  # report and carry on: one client's failure is not the federation's
                result.outcome, result.detail = "error", f"{type(exc).__name__}: {exc}"
            results.put(result)


def simulate(
    config: SimulationConfig,
    *,
    echo: Callable[[str], None] = print,
    on_ready: Callable[[str], None] | None = None,
    exit_timeout: float = 300.0,
) -> SimulationSummary:
    """Run the simulated clients until each has taken part in ``config.rounds`` rounds.

    ``on_ready(client_id)`` is called as each client process is up and waiting (tests open rounds
    only then, so no deadline depends on how fast processes start). A client that reported all its
    rounds is never counted as an error, however long its process takes to exit; one that has not
    exited ``exit_timeout`` seconds after the last result is stopped.
    """
    train, _ = digits(seed=config.seed)
    parts = partition(train.y, config.clients, scheme=config.partition, alpha=config.alpha, seed=config.seed)
    roles = config.roles()
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    processes = [
        ctx.Process(target=run_client, args=(config, cid, roles[cid], parts[i], results), name=cid, daemon=True)
        for i, cid in enumerate(config.client_ids())
    ]
    echo(
        f"simulate: {config.clients} clients ({dict(Counter(roles.values()))}), {config.partition} partition"
        f"{f' alpha={config.alpha}' if config.partition == 'dirichlet' else ''}, {config.rounds} round(s), "
        f"bucket {config.bucket_url}"
    )
    for p in processes:
        p.start()
    summary = SimulationSummary()
    expected = config.clients * config.rounds

    def take(timeout: float) -> bool:
        try:
            message = results.get(timeout=timeout)
        except queue.Empty:
            return False
        if isinstance(message, ClientReady):
            echo(f"{message.client_id} ready")
            if on_ready is not None:
                on_ready(message.client_id)
        else:
            summary.results.append(message)
            echo(message.line())
        return True

    try:
        while len(summary.results) < expected and any(p.is_alive() for p in processes):
            take(1.0)
        while take(0.2):  # drain what finished processes left behind
            pass
    finally:
        stop_by = time.monotonic() + exit_timeout
        for p in processes:  # clients that finished exit on their own; give them all the time they need
            p.join(timeout=max(0.0, stop_by - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
    rounds_done = Counter(r.client_id for r in summary.results)
    for p in processes:  # a client that did not report every round, or crashed doing so, is an error
        if rounds_done[p.name] < config.rounds:
            failed = ClientRoundResult(p.name, "-", roles[p.name], "error", detail=f"process exited {p.exitcode}")
            summary.results.append(failed)
            echo(failed.line())
    echo(summary.text())
    return summary


__all__ = ["ATTACKS", "ClientReady", "ClientRoundResult", "SimulationConfig", "SimulationSummary", "simulate"]
