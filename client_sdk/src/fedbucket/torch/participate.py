"""The long-running client: what a client organisation runs (``fedbucket participate``).

Round after round, until stopped: wait for an open round -> fetch its base model -> train with
the task's recipe on the local training data -> submit the delta; and when the server publishes a
round's candidate for federated evaluation, score the candidate and the base model on the local
validation data and submit the scores. One look at ``rounds/current.json`` per poll decides what
to do, so a client that starts late, restarts or misses a phase simply picks up the next one.

The client runs the task *it* was given and refuses any round whose model names another task
(the bucket never makes a client import code). Every refusal or failure is a line, never a crash:
one bad round does not stop the client; a storage failure is tried again at the next look. A
restarted client finds its own committed update or scores in the bucket and does not redo them.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedbucket.client.sdk import Client
from fedbucket.protocol.documents import EvaluationTask, ModelSpec, RoundTask, read_optional, utcnow
from fedbucket.protocol.errors import (
    ChecksumMismatch,
    ConfigError,
    FedbucketError,
    PrivacyBudgetExceeded,
    StorageError,
    WaitTimeout,
)
from fedbucket.protocol.tensors import load_tensors
from fedbucket.torch.dp_sgd import DPSGDSettings, LocalPrivacy
from fedbucket.torch.task import DIGITS_TASK, Examples, Task
from fedbucket.torch.training import load_global_weights


@dataclass
class ParticipationLog:
    """What this client did: rounds trained, candidates evaluated, rounds refused."""

    trained: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass
class Participant:
    """One client organisation's loop over rounds (see module doc).

    Args:
        client: the client's handle on the federation.
        task: the task package this client runs; ``task_reference`` is its ``module:attribute``.
        train: the local training examples; ``validation``: local validation examples for
            federated evaluation (``None``: this client does not evaluate).
        seed: seeds local training's shuffling (not a secret).
        local_privacy: train with DP-SGD under this client's own accountant and budget (the task's
            own recipe is not used then; docs/privacy.md).
    """

    client: Client
    task: Task
    task_reference: str | None
    train: Examples
    validation: Examples | None = None
    seed: int = 0
    poll_interval: float = 5.0
    echo: Callable[[str], None] = print
    progress: Callable[[str], None] | None = None
    log: ParticipationLog = field(default_factory=ParticipationLog)
    local_privacy: LocalPrivacy | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    last_echo: str = ""
    _handled: set[tuple[str, str]] = field(default_factory=set)
    _tasks: dict[str, RoundTask] = field(default_factory=dict)

    def remember(self, line: str) -> None:
        """An ``echo`` that only keeps the last line (for callers that report in their own words)."""
        self.last_echo = line

    def _ours(self, model: ModelSpec, round_id: str) -> bool:
        if (model.task or DIGITS_TASK) == (self.task_reference or DIGITS_TASK):
            return True
        if ("refuse", round_id) not in self._handled:
            self._handled.add(("refuse", round_id))
            self.log.refused.append(round_id)
            self.echo(
                f"round {round_id}: refused — it trains task {model.task or DIGITS_TASK!r}, "
                f"this client runs {self.task_reference or DIGITS_TASK!r}"
            )
        return False

    def step(self) -> str | None:
        """Look at the bucket once and do what it asks (train, or evaluate); returns what was done.

        A round this client already answered (in this process, or before a restart: its committed
        update or evaluation is in the bucket) is not answered again. A step that failed for a
        storage reason is tried again at the next look, until the deadline.
        """
        task = self.client.current_round()
        if task is not None and utcnow() < task.deadline and self._ours(task.model, task.round_id):
            self._tasks[task.round_id] = task
            if ("train", task.round_id) not in self._handled:
                self._handled.add(("train", task.round_id))
                submitted = self.client.submitted(task.round_id)
                if submitted is not None and submitted.base_model_version == task.base_model_version:
                    self.log.trained.append(task.round_id)
                    self.echo(f"round {task.round_id}: this client's update is already in the bucket")
                    return "trained"
                return self._retry_on_storage_error(("train", task.round_id), self.train_round, task)
        evaluation = self.client.current_evaluation() if self.validation is not None else None
        if (
            evaluation is not None
            and self._ours(evaluation.model, evaluation.round_id)
            and ("evaluate", evaluation.round_id) not in self._handled
        ):
            self._handled.add(("evaluate", evaluation.round_id))
            done = self.client.evaluated(evaluation.round_id)
            if done is not None and done.candidate_sha256 == evaluation.candidate_sha256:
                self.log.evaluated.append(evaluation.round_id)
                self.echo(f"round {evaluation.round_id}: this client's scores are already in the bucket")
                return "evaluated"
            return self._retry_on_storage_error(("evaluate", evaluation.round_id), self.evaluate_round, evaluation)
        return None

    def _retry_on_storage_error(self, key: tuple[str, str], step: Callable, document: object) -> str:
        outcome = step(document)
        if outcome == "retry":
            self._handled.discard(key)
        return outcome

    def train_round(self, task: RoundTask) -> str:
        """Fetch, train, submit for one round. Returns ``trained``, ``failed`` (a line says why) or
        ``retry`` (the bucket could not be reached: worth another try before the deadline)."""
        started = time.monotonic()
        try:
            model = self.task.build_model(task.model)
            load_global_weights(model, self.client.fetch_model(task))
            seed = int(np.random.default_rng([self.seed, len(self.log.trained)]).integers(2**31))
            if self.local_privacy is not None:
                metrics = self.local_privacy.fit(model, self.train, task.training, forward=self.task.forward)
            else:
                metrics = self.task.fit(model, self.train, task.training, seed=seed)
            self.client.submit(task, model.state_dict(), num_examples=len(self.train), metrics=metrics)
        except PrivacyBudgetExceeded as exc:  # not a failure: the client keeps its promise to its records
            self.log.refused.append(task.round_id)
            self.echo(f"round {task.round_id}: refused — {exc}")
            return "refused"
        except Exception as exc:  # a round's failure, even in the task's own code, is a line, not a crash
            return self._failed(task.round_id, "not submitted", exc)
        self.log.trained.append(task.round_id)
        self.last_metrics = metrics
        figures = "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
        self.echo(
            f"round {task.round_id}: trained on {len(self.train)} examples in {time.monotonic() - started:.1f}s "
            f"({figures}); update submitted"
        )
        return "trained"

    def evaluate_round(self, evaluation: EvaluationTask) -> str:
        """Score candidate and base on the validation data and submit: ``evaluated``, ``failed`` or ``retry``."""
        if self.validation is None:
            raise ConfigError("this client holds no validation data to score candidates with")
        try:
            candidate = self.task.build_model(evaluation.model)
            load_global_weights(candidate, self.client.fetch_candidate(evaluation))
            base = self.task.build_model(evaluation.model)
            base_file = self.client.fetch_model_file(evaluation.base_model_version)
            if evaluation.base_model_sha256 not in base_file.name:
                raise ChecksumMismatch(
                    f"the evaluation names base sha256 {evaluation.base_model_sha256}, not {base_file.name}"
                )
            load_global_weights(base, load_tensors(base_file))
            ours, theirs = self.task.score(candidate, self.validation), self.task.score(base, self.validation)
            self.client.submit_evaluation(evaluation, candidate=ours, current=theirs)
        except Exception as exc:  # as in train_round
            return self._failed(evaluation.round_id, "evaluation not submitted", exc)
        self.log.evaluated.append(evaluation.round_id)
        n = ours.examples
        self.echo(
            f"round {evaluation.round_id}: scored the candidate on {n} validation examples: accuracy "
            f"{sum(ours.true_positive) / n:.4f} (base {sum(theirs.true_positive) / n:.4f}); scores submitted"
        )
        return "evaluated"

    def _failed(self, round_id: str, what: str, exc: Exception) -> str:
        if isinstance(exc, StorageError):  # the bucket, not the round: look again
            self.echo(f"round {round_id}: {what} — {exc}; trying again")
            return "retry"
        self.log.failed.append(round_id)
        self.echo(f"round {round_id}: {what} — {type(exc).__name__}: {exc}" if not isinstance(exc, FedbucketError)
                  else f"round {round_id}: {what} — {exc}")  # fmt: skip
        return "failed"

    def finished(self, round_id: str) -> bool:
        """Whether round ``round_id`` needs nothing more from this client: it scored the candidate,
        the round asks for no scores (or this client has no validation data), the scoring deadline
        passed, or a newer round opened. (An abandoned round ends when the next one opens.)"""
        if round_id in self.log.evaluated:
            return True
        task = self._tasks.get(round_id)
        if task is not None and (not task.federated_evaluation or self.validation is None):
            return True
        evaluation, _ = read_optional(self.client.store, self.client.layout.evaluation_task(round_id), EvaluationTask)
        if evaluation is not None and utcnow() >= evaluation.deadline:
            return True
        current = self.client.current_round()
        return current is not None and current.round_id != round_id

    def run(
        self, *, rounds: int | None = None, timeout: float | None = None, stop: threading.Event | None = None
    ) -> ParticipationLog:
        """Loop until ``rounds`` rounds were trained and finished, ``stop`` is set, or nothing
        was asked for ``timeout`` seconds (:class:`WaitTimeout`)."""
        stop = stop or threading.Event()
        idle_since = time.monotonic()
        while not stop.is_set():
            done = self.step()
            if done is not None:
                idle_since = time.monotonic()
            if rounds is not None and len(self.log.trained) >= rounds and self.finished(self.log.trained[-1]):
                break
            waited = time.monotonic() - idle_since
            if timeout is not None and waited > timeout:
                raise WaitTimeout(f"nothing to do for {timeout:.0f}s")
            if self.progress is not None and done is None:
                self.progress(f"waiting for a round ({waited:.0f}s, {utcnow():%H:%M:%S} UTC)")
            stop.wait(self.poll_interval)
        return self.log


def _stop_on_signals(received: list[str]) -> threading.Event:
    """An event set by SIGINT (Ctrl-C) or SIGTERM (a service manager stopping the client): the loop
    ends after the step it is in; ``received`` gets the signal's name. Installed explicitly,
    because a process started in the background by a non-interactive shell inherits SIGINT
    ignored, and Python then never raises KeyboardInterrupt. (The handler only sets the event:
    printing from a signal handler can interrupt a print in progress.)"""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    return stop


def _local_privacy(args: argparse.Namespace, client: Client) -> LocalPrivacy | None:
    if args.dp_sgd_noise is None:
        if args.dp_sgd_epsilon is not None:
            raise ConfigError("--dp-sgd-epsilon needs --dp-sgd-noise (the noise multiplier of DP-SGD)")
        return None
    if args.dp_sgd_epsilon is None:
        raise ConfigError("--dp-sgd-noise needs --dp-sgd-epsilon: the local budget this client refuses to pass")
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise ConfigError("DP-SGD needs Opacus: pip install 'fedbucket[dp]'") from None
    settings = DPSGDSettings(args.dp_sgd_noise, args.dp_sgd_clip, args.dp_sgd_epsilon, args.dp_sgd_delta)
    state = Path(args.dp_sgd_state) if args.dp_sgd_state else client.cache_dir / f"dp-sgd-{client.client_id}.json"
    return LocalPrivacy(settings, state)


def cmd_participate(args: argparse.Namespace) -> int:
    """``fedbucket participate``: the loop above, with a progress line and a clean Ctrl-C."""
    from fedbucket.torch.task import load_task

    if not args.bucket or not args.client_id:
        raise ConfigError("--bucket and --client-id are required (or FEDBUCKET_BUCKET, FEDBUCKET_CLIENT_ID)")
    if not 0 <= args.validation_fraction < 1 or args.rounds < 0:
        raise ConfigError("need 0 <= --validation-fraction < 1 and --rounds >= 0")
    task = load_task(args.task)
    examples = task.load_data(args.data)
    if len(examples) < 2:
        raise ConfigError(f"{args.data}: {len(examples)} example(s); need at least 2")
    train, validation = examples, None
    if args.validation_fraction > 0:
        train, validation = examples.split(args.validation_fraction, seed=args.seed)
    interactive = sys.stderr.isatty() and not args.quiet

    def progress(line: str) -> None:
        if interactive:
            print(f"\r{line}\033[K", end="", file=sys.stderr, flush=True)

    def echo(line: str) -> None:
        if interactive:
            print("\r\033[K", end="", file=sys.stderr)
        print(line, flush=True)

    with Client(args.bucket, args.client_id, credentials=args.credentials, cache_dir=args.cache_dir,
                retry_timeout=args.timeout) as client:  # fmt: skip
        participant = Participant(
            client, task, args.task, train, validation, seed=args.seed, poll_interval=args.poll_interval,
            echo=echo, progress=progress, local_privacy=_local_privacy(args, client),
        )  # fmt: skip
        if participant.local_privacy is not None:
            settings = participant.local_privacy.settings
            echo(
                f"{args.client_id}: DP-SGD with noise {settings.noise_multiplier:g}, clip {settings.max_grad_norm:g}; "
                f"local epsilon {participant.local_privacy.epsilon:.3f} of {settings.epsilon_budget:g} at delta "
                f"{settings.delta:g} spent so far"
            )
        echo(
            f"{args.client_id}: task {task.name} ({args.task or 'built-in'}), {len(train)} training and "
            f"{len(validation) if validation else 0} validation examples; waiting for rounds at {client.store.url}"
        )
        received: list[str] = []
        log = participant.run(rounds=args.rounds or None, stop=_stop_on_signals(received))
        if received:
            echo(f"stopped ({received[0]})")
    echo(
        f"{args.client_id}: trained {len(log.trained)} round(s), evaluated {len(log.evaluated)}, "
        f"refused {len(log.refused)}, failed {len(log.failed)}"
    )
    return 1 if log.failed else 0  # stopped by a signal included: 0 unless a round failed on the way
