"""The client SDK against both stores: round trip, refusals, cache, delta exactness, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_SPEC, tiny_model
from fedbucket import (
    LAYOUT,
    Client,
    RoundNotOpen,
    SchemaMismatch,
    StaleUpdate,
    TrainingConfig,
    WaitTimeout,
    apply_delta,
    compute_delta,
    load_tensors,
    validate_update,
)
from fedbucket.cli import EXIT_NO_ROUND, EXIT_OK, EXIT_REJECTED, EXIT_USAGE, main
from fedbucket.protocol.documents import ModelSpec, utcnow
from fedbucket.protocol.tensors import save_tensors
from fedbucket.server.rounds import close_round, open_round, publish_model, set_current_model
from fedbucket.torch.digits import digits
from fedbucket.torch.task import build_model
from fedbucket.torch.training import load_global_weights, state_dict_to_numpy, train_local


def trained_from(base: dict[str, np.ndarray], seed: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: (v + (0.01 * rng.standard_normal(v.shape)).astype(v.dtype)) if v.dtype.kind == "f" else v + 2
        for k, v in base.items()
    }


def test_round_trip(store, store_url, open_task, tmp_path):
    with Client(store_url, "hospital-a", cache_dir=tmp_path / "cache") as client:
        task = client.current_round()
        assert task == open_task
        base = client.fetch_model(task)
        assert all(isinstance(v, torch.Tensor) for v in base.values())
        base_np = client.fetch_model(task, as_numpy=True)
        trained = trained_from(base_np)
        manifest = client.submit(task, trained, num_examples=17, metrics={"loss": 0.25})
        assert client.submitted(task.round_id) == manifest
    update = validate_update(store, open_task, LAYOUT.update_manifest("hospital-a", open_task.round_id))
    assert update.manifest.num_examples == 17 and update.manifest.metrics == {"loss": 0.25}
    delta = load_tensors(_payload_file(store, update.payload_name, tmp_path))
    rebuilt = apply_delta(base_np, delta)
    for name in trained:
        assert rebuilt[name].dtype == trained[name].dtype
        assert np.array_equal(rebuilt[name], trained[name]), name  # bit-exact
    assert delta["norm.num_batches_tracked"] == 2


def _payload_file(store, name, tmp_path):
    path = tmp_path / "payload.safetensors"
    store.download_file(name, path)
    return path


def test_delta_after_real_training_is_exact_wherever_float32_can_be():
    """base + delta == trained bit for bit wherever float32 can represent trained - base exactly
    (Sterbenz: trained and base within a factor 2 of each other); elsewhere no float32 delta can
    give back trained exactly, and the error is at most half an ulp of the delta."""
    train, _ = digits()
    model = build_model(ModelSpec(name="cnn"), seed=1)
    base = state_dict_to_numpy(model)
    train_local(model, train.subset(slice(0, 200)), TrainingConfig(local_epochs=2, learning_rate=0.1))
    trained = state_dict_to_numpy(model)
    delta = compute_delta(model.state_dict(), base)
    rebuilt = apply_delta(base, delta)
    assert any(not np.array_equal(base[k], trained[k]) for k in base)
    exact = total = 0
    for name, t in trained.items():
        b, r = base[name], rebuilt[name]
        if t.dtype.kind != "f":
            assert np.array_equal(r, t), name
            continue
        sterbenz = (np.sign(b) == np.sign(t)) & (np.abs(t) / 2 <= np.abs(b)) & (np.abs(b) <= 2 * np.abs(t))
        assert np.array_equal(r[sterbenz], t[sterbenz]), name
        assert np.all(np.abs(r.astype(np.float64) - t) <= np.spacing(np.abs(delta[name])) / 2 + np.spacing(np.abs(t)))
        exact += int((r == t).sum())
        total += t.size
    assert exact / total > 0.5


def test_cache_downloads_a_version_once(store_url, open_task, tmp_path):
    with Client(store_url, "c1", cache_dir=tmp_path / "cache") as client:
        calls = []
        original = client.store.download_file
        client.store.download_file = lambda *a, **k: calls.append(a) or original(*a, **k)
        first = client.fetch_model_file(open_task.base_model_version)
        second = client.fetch_model_file(open_task.base_model_version)
        client.fetch_model(open_task)
        assert first == second and len(calls) == 1


def test_refusals(store, store_url, open_task, tmp_path):
    with Client(store_url, "c1", cache_dir=tmp_path / "cache") as client:
        base = client.fetch_model(open_task, as_numpy=True)
        with pytest.raises(SchemaMismatch, match="shape"):
            client.submit(open_task, base | {"layer.bias": np.zeros(8, np.float32)}, num_examples=1)
        with pytest.raises(SchemaMismatch, match="missing"):
            client.submit(open_task, {"layer.bias": base["layer.bias"]}, num_examples=1)
        late = open_task.model_copy(update={"deadline": utcnow() - timedelta(seconds=1)})
        with pytest.raises(RoundNotOpen, match="stopped taking updates"):
            client.submit(late, base, num_examples=1)
        newer = open_round(store, round_id="r2", opened_at=utcnow(), deadline_seconds=60, training=open_task.training)
        with pytest.raises(StaleUpdate, match="current round: r2"):
            client.submit(open_task, base, num_examples=1)
        close_round(store, newer.round_id)
        assert client.current_round() is None
        with pytest.raises(RoundNotOpen, match="closed"):
            client.submit(newer, base, num_examples=1)
    assert list(store.list("updates/")) == []


def test_no_round_and_waiting(store, store_url, tmp_path):
    with Client(store_url, "c1", cache_dir=tmp_path) as client:
        assert client.current_round() is None
        t0 = time.monotonic()
        with pytest.raises(WaitTimeout):
            client.wait_for_round(timeout=0.3, poll_interval=0.1)
        assert time.monotonic() - t0 < 120  # gives up: bounded (generously: the machine may be busy)

        def opener() -> None:
            time.sleep(0.3)
            manifest = publish_model(store, tiny_model(), version="init", model=TINY_SPEC)
            set_current_model(store, manifest, expected_generation=0)
            open_round(store, round_id="late-open", opened_at=utcnow(), deadline_seconds=60, training=TrainingConfig())

        thread = threading.Thread(target=opener)
        thread.start()
        task = client.wait_for_round(timeout=600, poll_interval=0.1)
        thread.join()
        assert task.round_id == "late-open"


def test_three_line_torch_integration(store, tmp_path):
    """fetch -> load_state_dict -> train -> submit, with a zoo model, as in the client guide."""
    spec = ModelSpec(name="mlp", kwargs={"hidden": 16})
    initial = build_model(spec, seed=0)
    manifest = publish_model(store, state_dict_to_numpy(initial), version="init", model=spec)
    set_current_model(store, manifest, expected_generation=0)
    task = open_round(store, round_id="r1", opened_at=utcnow(), deadline_seconds=600, training=TrainingConfig())
    train, _ = digits()
    model = build_model(spec, seed=99)  # different weights until the global ones are loaded
    with Client(store.url, "c1", cache_dir=tmp_path) as client:
        load_global_weights(model, client.fetch_model(task))
        for name, value in model.state_dict().items():
            assert torch.equal(value, initial.state_dict()[name]), name
        metrics = train_local(model, train.subset(slice(0, 100)), task.training)
        client.submit(task, model.state_dict(), num_examples=100, metrics=metrics)
    assert validate_update(store, task, LAYOUT.update_manifest("c1", "r1")).l2_norm > 0
    wrong = build_model(ModelSpec(name="cnn"), seed=0)
    with pytest.raises(RuntimeError):  # strict: another architecture's names do not load
        load_global_weights(wrong, load_tensors(client.fetch_model_file("init")))


def test_cli(store, store_url, open_task, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDBUCKET_BUCKET", store_url)
    monkeypatch.setenv("FEDBUCKET_CLIENT_ID", "cli-client")
    monkeypatch.setenv("FEDBUCKET_CACHE", str(tmp_path / "cache"))
    assert main(["status"]) == EXIT_OK
    assert "r1" in capsys.readouterr().out
    out = tmp_path / "global.safetensors"
    assert main(["fetch", "-o", str(out), "-q"]) == EXIT_OK
    trained = trained_from(load_tensors(out))
    save_tensors(trained, tmp_path / "trained.safetensors")
    assert (
        main(["submit", str(tmp_path / "trained.safetensors"), "--num-examples", "9", "--metric", "loss=0.5", "-q"])
        == 0
    )
    assert main(["status", "--json"]) == EXIT_OK
    assert '"num_examples": 9' in capsys.readouterr().out
    bad = dict(trained)
    bad["layer.bias"] = np.full(7, np.nan, np.float32)
    save_tensors(bad, tmp_path / "bad.safetensors")
    capsys.readouterr()
    assert main(["submit", str(tmp_path / "bad.safetensors"), "--num-examples", "9", "-q"]) == EXIT_REJECTED
    err = capsys.readouterr().err
    assert "non_finite" in err and "Traceback" not in err
    assert (
        main(["submit", str(tmp_path / "trained.safetensors"), "--num-examples", "9", "--metric", "oops"]) == EXIT_USAGE
    )
    close_round(store, open_task.round_id)
    assert main(["status"]) == EXIT_NO_ROUND
    assert main(["submit", str(tmp_path / "trained.safetensors"), "--num-examples", "9", "-q"]) == EXIT_NO_ROUND


def test_cli_help_has_examples_and_exit_codes(capsys):
    for command in ([], ["status"], ["fetch"], ["submit"], ["simulate"]):
        with pytest.raises(SystemExit) as info:
            main([*command, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert "example" in text and "exit codes" in text


def test_bring_your_own_model_example_runs(store, tmp_path):
    spec = ModelSpec(name="mlp", kwargs={"hidden": 64})
    manifest = publish_model(store, state_dict_to_numpy(build_model(spec, seed=0)), version="init", model=spec)
    set_current_model(store, manifest, expected_generation=0)
    task = open_round(store, round_id="r1", opened_at=utcnow(), deadline_seconds=600, training=TrainingConfig())
    example = Path(__file__).resolve().parents[1] / "examples" / "bring_your_own_model.py"
    env = {**os.environ, "FEDBUCKET_CACHE": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, str(example), "--bucket", store.url, "--client-id", "byo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "submitted" in run.stdout
    assert validate_update(store, task, LAYOUT.update_manifest("byo", "r1")).manifest.num_examples == 1797
