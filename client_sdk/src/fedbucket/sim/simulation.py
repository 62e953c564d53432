"""A simulated federation: N client processes that really train and submit updates.

The task is any task package (``--task``; default the built-in digits task) and the data its
``example_data`` makes or a file its ``load_data`` reads (``--data``), dealt out IID or
Dirichlet non-IID. Each client is a separate OS process with its own :class:`~fedbucket.Client`,
its own partition (of which ``validation_fraction`` is kept back as local validation data) and a role:

- ``honest``: waits for a round, trains with the task's recipe, submits; when the round's
  candidate is published for federated evaluation, scores it on its validation data and submits;
- ``dropout``: fetches the round's model, then never answers (a silent client);
- ``straggler``: trains, then submits only after the deadline (the server must call it late);
- ``hostile``: sends a malformed or poisoned update, a different attack each round (wrong shapes,
  NaN, huge values, a pickle renamed to .safetensors, a truncated file), bypassing the SDK's own
  checks the way a real attacker would; and in federated evaluation, absurd scores (a perfect
  candidate over an example count past the bound, or within it: then it must be trimmed).

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
from typing import TYPE_CHECKING, Literal

import numpy as np

from fedbucket.protocol.documents import (
    ClientEvaluation,
    EvaluationTask,
    ModelScore,
    RoundTask,
    UpdateManifest,
    utcnow,
)
from fedbucket.protocol.errors import ConfigError, RoundNotOpen, WaitTimeout
from fedbucket.protocol.layout import LAYOUT
from fedbucket.protocol.tensors import NUMPY_DTYPES, tensors_to_bytes
from fedbucket.sim.datasets import Partition, partition

if TYPE_CHECKING:
    from fedbucket.torch.task import Examples

Role = Literal["honest", "dropout", "straggler", "hostile"]
ATTACKS = ("wrong_shape", "nan", "huge_values", "pickle", "truncated")
EVALUATION_ATTACKS = ("perfect_within_bound", "too_many_examples")


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
    task: str | None = None  # package.module:attribute; None = the built-in digits task
    data: str | None = None  # what the task's load_data reads; None = its example_data(seed)
    validation_fraction: float = 0.2  # of each client's partition, kept for federated evaluation
    holdout_fraction: float = 0.2  # of the task's example data, left to the server's splits (as init does)

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


def simulation_data(config: SimulationConfig) -> Examples:
    """The examples the simulated clients share out: all of ``--data``, or the clients' pool of the
    task's example data — never the rows ``fedbucket init`` (same seed and holdout fraction)
    gave the server as its validation and test splits."""
    from fedbucket.torch.task import example_split, load_task

    task = load_task(config.task)
    if config.data is not None:
        return task.load_data(config.data)
    return example_split(task, seed=config.seed, holdout_fraction=config.holdout_fraction)[0]


def _forged_evaluation(attack: str, client_id: str, evaluation: EvaluationTask) -> ClientEvaluation:
    """A well-formed evaluation claiming a perfect candidate and a useless base model."""
    n = (evaluation.max_examples_per_report or 10_000) + (1 if attack == "too_many_examples" else 0)
    classes = evaluation.num_classes
    perfect = [n // classes + (1 if c < n % classes else 0) for c in range(classes)]
    zeros = [0] * classes
    return ClientEvaluation(
        client_id=client_id,
        round_id=evaluation.round_id,
        candidate_sha256=evaluation.candidate_sha256,
        base_model_version=evaluation.base_model_version,
        candidate=ModelScore(
            examples=n, loss_sum=0.0, true_positive=perfect, false_positive=zeros, false_negative=zeros
        ),
        current=ModelScore(
            examples=n,
            loss_sum=float(n * 50),
            true_positive=zeros,
            false_positive=perfect[1:] + perfect[:1],
            false_negative=perfect,
        ),
        created_at=utcnow(),
    )


def _wait_for_evaluation(client, task: RoundTask, config: SimulationConfig) -> EvaluationTask | None:  # noqa: ANN001
    """The evaluation task of ``task``'s round once published; ``None`` if a newer round opened
    first (this one was abandoned) or nothing came within the round timeout."""
    give_up = time.monotonic() + config.round_timeout
    while time.monotonic() < give_up:
        evaluation = client.current_evaluation()
        if evaluation is not None and evaluation.round_id == task.round_id:
            return evaluation
        current = client.current_round()
        if current is not None and current.round_id != task.round_id:
            return None
        time.sleep(config.poll_interval)
    return None


def run_client(config: SimulationConfig, client_id: str, role: Role, indices: np.ndarray, results: mp.Queue) -> None:
    """One simulated client process: take part in ``config.rounds`` rounds, report each."""

    import torch

    from fedbucket.client import Client, compute_delta, upload_update
    from fedbucket.protocol.tensors import save_tensors
    from fedbucket.torch.participate import Participant
    from fedbucket.torch.task import load_task
    from fedbucket.torch.training import load_global_weights

    torch.set_num_threads(1)
    task_package = load_task(config.task)
    client_number = config.client_ids().index(client_id)
    share = simulation_data(config).subset(indices)
    train, validation = share.split(config.validation_fraction, seed=client_number)
    rng = np.random.default_rng([config.seed, client_number])
    last_round: str | None = None
    with Client(config.bucket_url, client_id, cache_dir=config.cache_dir) as client:
        participant = Participant(client, task_package, config.task, share, validation, seed=client_number)
        participant.echo = participant.remember  # the result lines below say what happened
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
                    _write_raw_update(client.store, task, client_id, _hostile_payload(attack, task, rng), len(train))
                    result.outcome = f"hostile:{attack}"
                    if task.federated_evaluation and (evaluation := _wait_for_evaluation(client, task, config)):
                        forged = EVALUATION_ATTACKS[(round_index + client_number) % len(EVALUATION_ATTACKS)]
                        report = _forged_evaluation(forged, client_id, evaluation)
                        client.store.put_bytes(
                            LAYOUT.client_evaluation(client_id, task.round_id), report.to_json_bytes()
                        )
                        result.detail = f"forged evaluation: {forged}"
                elif role == "dropout":
                    load_global_weights(task_package.build_model(task.model), client.fetch_model(task))
                    result.outcome = "dropped"
                elif role == "straggler":
                    model = task_package.build_model(task.model)
                    load_global_weights(model, client.fetch_model(task))
                    metrics = task_package.fit(model, train, task.training, seed=int(rng.integers(2**31)))
                    result.num_examples, result.loss, result.accuracy = len(train), metrics["loss"], metrics["accuracy"]
                    if task.secure_aggregation is not None:  # late for phase 1: the SDK refuses, the round goes on
                        time.sleep(max(0.0, (task.secure_aggregation.keys_deadline - utcnow()).total_seconds()) + 1.0)
                        try:
                            client.submit(task, model.state_dict(), num_examples=len(train))
                        except RoundNotOpen as exc:
                            result.outcome, result.detail = "late", str(exc)
                            results.put(result)
                            continue
                    time.sleep(max(0.0, (task.deadline - utcnow()).total_seconds()) + 1.0)
                    base = client.fetch_model(task, as_numpy=True)
                    with tempfile.TemporaryDirectory() as tmp:
                        path = Path(tmp) / "late.safetensors"
                        save_tensors(compute_delta(model.state_dict(), base), path)
                        upload_update(
                            client.store, task, client_id, path, num_examples=len(train), check_deadline=False
                        )
                    result.outcome = "late"
                else:
                    # Validation data is kept back only from rounds that ask for scores.
                    participant.train = train if task.federated_evaluation else share
                    if participant.train_round(task) != "trained":
                        raise RuntimeError(f"training round {task.round_id} failed")
                    metrics = participant.last_metrics
                    result.num_examples = len(participant.train)
                    result.loss, result.accuracy = metrics["loss"], metrics["accuracy"]
                    evaluation = _wait_for_evaluation(client, task, config) if task.federated_evaluation else None
                    if evaluation is not None:
                        scored = participant.evaluate_round(evaluation)
                        result.detail = (
                            f"scored the candidate on {len(validation)} examples"
                            if scored == "evaluated"
                            else f"scoring the candidate {scored}: {participant.last_echo}"
                        )
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
    data = simulation_data(config)
    parts = partition(data.y, config.clients, scheme=config.partition, alpha=config.alpha, seed=config.seed)
    roles = config.roles()
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    processes = [
        ctx.Process(target=run_client, args=(config, cid, roles[cid], parts[i], results), name=cid, daemon=True)
        for i, cid in enumerate(config.client_ids())
    ]
    echo(
        f"simulate: task {config.task or 'digits (built-in)'}, {len(data)} examples, "
        f"{config.clients} clients ({dict(Counter(roles.values()))}), {config.partition} partition"
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


__all__ = [
    "ATTACKS",
    "EVALUATION_ATTACKS",
    "ClientReady",
    "ClientRoundResult",
    "SimulationConfig",
    "SimulationSummary",
    "simulate",
]
