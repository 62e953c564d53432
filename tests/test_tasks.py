"""A user's own task end to end: the text-classification task package through `fedbucket init`,
`fedbucket simulate --task` and federated evaluation; `fedbucket participate` round after round.

The server steps run in-process here (the same functions the DAG's steps call); the real DAG with
federated evaluation is in tests/test_dag.py. Every wait is on an event in the bucket, bounded
generously; rounds open only after the clients are ready, and their deadlines are far away.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from fedbucket.protocol.documents import EvaluationTask, RoundTask, TrainingConfig, utcnow
from fedbucket.protocol.errors import ConfigError
from fedbucket.protocol.layout import LAYOUT
from fedbucket.protocol.storage import ObjectStore, open_store
from fedbucket.protocol.tensors import save_tensors
from fedbucket.server.aggregation import run_aggregation
from fedbucket.server.config import EvaluationSettings, FederationConfig
from fedbucket.server.evaluation import run_evaluation
from fedbucket.server.promotion import gate_decision, promote_candidate
from fedbucket.server.rounds import (
    freeze_evaluations,
    freeze_round,
    open_round,
    request_evaluation,
    survey_evaluations,
    survey_round,
)
from fedbucket.server.strategies import build_strategy
from fedbucket.torch.task import load_task

TEXT_TASK = "fedbucket_textclf.task:TASK"
FEDBUCKET = str(Path(sys.executable).parent / "fedbucket")
#: Bound on every wait for an event (generous: a busy shared machine).
EVENT_TIMEOUT = 600


def wait_for(condition, what: str, process: subprocess.Popen | None = None) -> None:
    stop = time.monotonic() + EVENT_TIMEOUT
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the client process exited {process.returncode} while waiting for {what}")
        assert time.monotonic() < stop, f"timed out after {EVENT_TIMEOUT} s waiting for {what}"
        time.sleep(0.2)


def write_config(path: Path, bucket: str, *, task: str | None, model: str, extra: str = "") -> Path:
    task_line = f'task = "{task}", ' if task else ""
    path.write_text(
        f'bucket = "{bucket}"\nmodel = {{ {task_line}name = "{model}", kwargs = {{}} }}\n\n'
        f"[training]\nlocal_epochs = 2\nlearning_rate = 0.02\n{extra}\n"
        '[gate]\nsource = "federated"\nmetric = "macro_f1"\ntolerance = 0.0\n'
    )
    return path


def server_round(
    store: ObjectStore,
    round_id: str,
    config: FederationConfig,
    *,
    updates: int,
    reports: int,
    evaluation: EvaluationSettings,
    client=None,
) -> None:
    """Open a round, wait for ``updates`` valid updates, aggregate, publish the candidate and wait
    for ``reports`` client evaluations (accepted or rejected), evaluate: what the DAG does."""
    task: RoundTask = open_round(
        store, round_id=round_id, opened_at=utcnow(), deadline_seconds=3600, training=config.training,
        min_clients=updates, federated_evaluation=True,
    )  # fmt: skip
    wait_for(lambda: len(survey_round(store, task).on_time) >= updates, f"{updates} updates", client)
    freeze_round(store, task, reason="quorum", closed_at=utcnow())
    assert run_aggregation(store, round_id, build_strategy("fedavg"), min_clients=updates).status == "aggregated"
    scoring: EvaluationTask = request_evaluation(
        store, round_id, evaluation, num_classes=load_task(config.model.task).num_classes, opened_at=utcnow()
    )

    def reported() -> bool:
        survey = survey_evaluations(store, scoring)
        return len(survey.on_time) + len(survey.rejected) >= reports

    wait_for(reported, f"{reports} client evaluations", client)
    freeze_evaluations(store, scoring, reason="quorum", closed_at=utcnow())
    run_evaluation(store, round_id, metric=config.gate.metric)


def test_text_task_simulated_federation_gates_on_the_clients_scores(tmp_path):
    """generated corpus -> `fedbucket init` (no server data) -> `fedbucket simulate --task --data`
    with a hostile client -> federated evaluation gates and promotes the text model."""
    from fedbucket_textclf.data import generate_corpus

    corpus = tmp_path / "messages.csv"
    generate_corpus(2000, seed=3, path=corpus)
    bucket = (tmp_path / "bucket").as_uri()
    config_path = write_config(
        tmp_path / "federation.toml", bucket, task=TEXT_TASK, model="ngram", extra='extra = { optimizer = "adamw" }\n'
    )
    init = subprocess.run([FEDBUCKET, "init", "--config", str(config_path)], capture_output=True, text=True)
    assert init.returncode == 0, init.stderr
    assert "the server holds no evaluation data" in init.stdout
    store = open_store(bucket)
    assert not store.exists(LAYOUT.validation_split)
    config = FederationConfig.load(config_path)

    simulate = subprocess.Popen(
        [FEDBUCKET, "simulate", "--bucket", bucket, "--task", TEXT_TASK, "--data", str(corpus), "--clients", "4",
         "--rounds", "1", "--partition", "iid", "--hostile", "1", "--poll-interval", "0.2",
         "--cache-dir", str(tmp_path / "cache")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    assert simulate.stdout is not None
    while sum(line.endswith(" ready") for line in lines) < 4:  # every client is up before the round opens
        line = simulate.stdout.readline()
        assert line, f"simulate exited before its clients were ready: {lines}"
        lines.append(line.rstrip())
    scoring = EvaluationSettings(deadline_seconds=3600, min_clients=3, trim_fraction=0.25)
    server_round(store, "text-1", config, updates=3, reports=4, evaluation=scoring, client=simulate)
    output, _ = simulate.communicate(timeout=EVENT_TIMEOUT)
    lines += output.splitlines()
    assert simulate.returncode == 0, "\n".join(lines)
    assert any("task fedbucket_textclf.task:TASK" in line for line in lines)

    from fedbucket.protocol.documents import EvaluationReport, read_document

    evaluation, _ = read_document(store, LAYOUT.evaluation_report("text-1"), EvaluationReport)
    federated = evaluation.federated
    assert federated is not None and federated.candidate is not None and federated.current is not None
    hostile = "client-03"  # the last client is the hostile one
    refused = {v.client_id for v in federated.rejected} | set(federated.trimmed)
    assert hostile in refused and hostile not in federated.used  # a forged score neither pooled nor gating
    assert federated.candidate.macro_f1 > federated.current.macro_f1  # one round of FedAvg learned something
    decision = gate_decision(evaluation, config.gate)
    assert decision.passed, decision.message
    assert promote_candidate(store, "text-1").moved


def test_a_task_that_cannot_import_fails_init_before_anything_is_written(tmp_path):
    bucket = tmp_path / "bucket"
    config = write_config(tmp_path / "f.toml", bucket.as_uri(), task="no_such_package.task:TASK", model="x")
    run = subprocess.run([FEDBUCKET, "init", "--config", str(config)], capture_output=True, text=True)
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and "cannot import task module" in run.stderr
    assert not bucket.exists() or not any(bucket.rglob("*"))  # nothing written


def test_training_extra_is_checked_against_the_task():
    task = load_task(TEXT_TASK)
    task.check_training(TrainingConfig(extra={"optimizer": "sgd", "weight_decay": 0.01}))
    with pytest.raises(ConfigError, match="optimizer"):
        task.check_training(TrainingConfig(extra={"optimizer": "lbfgs"}))
    with pytest.raises(ConfigError, match=r"takes no training\.extra"):
        load_task(None).check_training(TrainingConfig(extra={"momentum": 0.5}))


def test_participate_trains_scores_and_refuses_other_tasks(tmp_path):
    """Two long-running clients: one runs the federation's task (trains, then scores the
    candidate, then exits after --rounds 1); one runs another task, refuses the round and stops
    cleanly on Ctrl-C — also when started with SIGINT ignored, as background jobs of a
    non-interactive shell are."""
    from fedbucket.torch.digits import digits

    bucket = (tmp_path / "bucket").as_uri()
    config_path = write_config(tmp_path / "federation.toml", bucket, task=None, model="mlp")
    assert subprocess.run([FEDBUCKET, "init", "--config", str(config_path)], capture_output=True).returncode == 0
    config = FederationConfig.load(config_path)
    store = open_store(bucket)
    train, _ = digits()
    data = tmp_path / "local.safetensors"
    save_tensors(train.subset(np.arange(400)).as_tensors(), data)
    corpus = tmp_path / "messages.csv"
    from fedbucket_textclf.data import generate_corpus

    generate_corpus(50, seed=1, path=corpus)
    env = {**os.environ, "FEDBUCKET_BUCKET": bucket, "FEDBUCKET_CACHE": str(tmp_path / "cache")}
    common = ["--poll-interval", "0.2", "-q"]
    ours = subprocess.Popen(
        [FEDBUCKET, "participate", "--client-id", "site-a", "--data", str(data), "--rounds", "1", *common],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    other = subprocess.Popen(
        [FEDBUCKET, "participate", "--client-id", "site-b", "--task", TEXT_TASK, "--data", str(corpus), *common],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as `cmd &` in a script leaves it
    )  # fmt: skip
    try:
        # A client reports what it holds before it waits: the round opens once both are up.
        for process in (ours, other):
            assert process.stdout is not None
            assert "waiting for rounds" in process.stdout.readline()
        one_report = EvaluationSettings(deadline_seconds=3600, min_clients=1, trim_fraction=0.0)
        server_round(store, "p-1", config, updates=1, reports=1, evaluation=one_report, client=ours)
        out, err = ours.communicate(timeout=EVENT_TIMEOUT)
        assert ours.returncode == 0, out + err
        assert "round p-1: trained on 320 examples" in out and "scored the candidate on 80" in out
        assert "trained 1 round(s), evaluated 1" in out
        assert store.exists(LAYOUT.client_evaluation("site-a", "p-1"))
        assert not store.exists(LAYOUT.update_manifest("site-b", "p-1"))
        other.send_signal(signal.SIGINT)  # Ctrl-C (handled even where SIGINT was inherited ignored)
        out, err = other.communicate(timeout=EVENT_TIMEOUT)
        assert other.returncode == 0 and "round p-1: refused" in out and "stopped (SIGINT)" in out, out + err
        assert "Traceback" not in err
    finally:
        for process in (ours, other):
            if process.poll() is None:
                process.kill()


def test_example_counts_must_add_up_in_a_client_evaluation():
    from fedbucket.protocol.documents import ClientEvaluation, ModelScore
    from fedbucket.protocol.errors import InvalidEvaluation, LateUpdate, StaleUpdate
    from fedbucket.protocol.validation import check_client_evaluation

    now = utcnow()
    task = EvaluationTask(
        round_id="r", candidate_sha256="a" * 64, base_model_version="init", base_model_sha256="b" * 64,
        model={"name": "mlp"}, num_classes=2, opened_at=now, deadline=now + timedelta(minutes=5),
        max_examples_per_report=100,
    )  # fmt: skip

    def report(examples: int = 10, tp=(4, 4), fp=(1, 1), fn=(1, 1), sha: str = "a" * 64) -> ClientEvaluation:
        score = ModelScore(
            examples=examples, loss_sum=3.0, true_positive=list(tp), false_positive=list(fp), false_negative=list(fn)
        )
        return ClientEvaluation(
            client_id="c", round_id="r", candidate_sha256=sha, base_model_version="init", candidate=score,
            current=score, created_at=now,
        )  # fmt: skip

    check_client_evaluation(task, report(), now)
    for bad, error in (
        (report(tp=(5, 4)), InvalidEvaluation),  # 9 + 2 misses != 10 examples
        (report(tp=(4,), fp=(1,), fn=(1,)), InvalidEvaluation),  # wrong number of classes
        (report(examples=101, tp=(50, 49), fp=(1, 1), fn=(1, 1)), InvalidEvaluation),  # past the bound
        (report(sha="c" * 64), StaleUpdate),  # another candidate
    ):
        with pytest.raises(error):
            check_client_evaluation(task, bad, now)
    with pytest.raises(LateUpdate):
        check_client_evaluation(task, report(), task.deadline + timedelta(seconds=1))
