"""Aggregation: every strategy against a straightforward reference, determinism, robustness,
rejected updates, quorum, and the real Spark job under spark-submit against both stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from conftest import submit_deltas
from fedbucket import LAYOUT, ObjectStore, tensors_to_bytes
from fedbucket.client import upload_update
from fedbucket.protocol.documents import AggregationReport, ModelManifest, UpdateManifest, read_document, utcnow
from fedbucket.server.aggregation import run_aggregation
from fedbucket.server.promotion import promote_candidate
from fedbucket.server.rounds import freeze_round
from fedbucket.server.strategies import STRATEGIES, build_strategy

REPO = Path(__file__).resolve().parents[1]
ODD_SHAPES = {"w": (7, 13), "b": (13,), "s": (), "conv": (3, 2, 5, 1), "count": ()}


def random_model(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    model = {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in ODD_SHAPES.items() if n != "count"}
    model["count"] = np.array(int(rng.integers(0, 5)), dtype=np.int64)
    return model


def setup_round(
    store: ObjectStore, tmp_path: Path, deltas: dict[str, dict], examples: dict[str, int], round_id: str = "r1"
):
    """Publish ``random_model(0)`` as the current model if none, open a round, submit the deltas."""
    return submit_deltas(store, tmp_path, round_id, random_model(0), deltas, examples)


def client_deltas(n: int, seed: int = 100) -> tuple[dict[str, dict], dict[str, int]]:
    deltas, examples = {}, {}
    for i in range(n):
        d = random_model(seed + i, scale=0.1 * (i + 1))
        d["count"] = np.array(i + 1, dtype=np.int64)
        deltas[f"c{i}"] = d
        examples[f"c{i}"] = 10 + 7 * i
    return deltas, examples


def candidate(store: ObjectStore, round_id: str = "r1") -> dict[str, np.ndarray]:
    data, _ = store.get_bytes(LAYOUT.candidate_payload(round_id))
    from fedbucket import tensors_from_bytes

    return tensors_from_bytes(data)


# -- a straightforward reference: whole arrays, formulas from the papers --------------------------


def reference(base, deltas, examples, name, options, state):
    clients = sorted(deltas)
    floats = [k for k in base if base[k].dtype.kind == "f"]
    clip = options.get("clip_norm")
    scale = {}
    for c in clients:
        norm = np.sqrt(sum(np.sum(deltas[c][k].astype(np.float64) ** 2) for k in floats))
        scale[c] = 1.0 if clip is None or norm <= clip else clip / norm
    w = np.array([examples[c] for c in clients], dtype=np.float64)
    w /= w.sum()
    lr = options.get("server_learning_rate", 0.1 if name in ("fedadam", "fedyogi", "fedadagrad") else 1.0)
    out, new_state = {}, {}
    for k in base:
        rows = np.stack([deltas[c][k].astype(np.float64).ravel() * (scale[c] if k in floats else 1) for c in clients])
        b = base[k].astype(np.float64).ravel()
        if k not in floats:
            out[k] = (b + np.rint(w @ rows)).reshape(base[k].shape).astype(base[k].dtype)
            continue
        if name == "fedmedian":
            agg = np.median(rows, axis=0)
        elif name == "fedtrimmedavg":
            agg = stats.trim_mean(rows, options.get("beta", 0.2), axis=0)
        else:
            agg = w @ rows
        if name in ("fedavg", "fedmedian", "fedtrimmedavg"):
            new = b + lr * agg
        elif name == "fedavgm":
            v = options.get("momentum", 0.9) * state.get(("momentum", k), 0) + agg
            new_state[("momentum", k)] = v
            new = b + lr * v
        else:
            b1, b2, tau = options.get("beta1", 0.9), options.get("beta2", 0.99), options.get("tau", 1e-3)
            m = b1 * state.get(("m", k), 0) + (1 - b1) * agg
            v0 = state.get(("v", k), tau**2)
            if name == "fedadagrad":
                v = v0 + agg**2
            elif name == "fedadam":
                v = b2 * v0 + (1 - b2) * agg**2
            else:
                v = v0 - (1 - b2) * agg**2 * np.sign(v0 - agg**2)
            new_state[("m", k)], new_state[("v", k)] = m, v
            new = b + lr * m / (np.sqrt(v) + tau)
        out[k] = new.reshape(base[k].shape).astype(base[k].dtype)
    return out, new_state


CASES = [
    ("fedavg", {}),
    ("fedavg", {"clip_norm": 0.5}),
    ("fedavg", {"server_learning_rate": 0.7}),
    ("fedavgm", {"momentum": 0.8}),
    ("fedadagrad", {}),
    ("fedadam", {"beta2": 0.95}),
    ("fedyogi", {"tau": 1e-2}),
    ("fedmedian", {}),
    ("fedmedian", {"clip_norm": 0.3}),
    ("fedtrimmedavg", {"beta": 0.2}),
]


def test_every_strategy_is_covered():
    assert {name for name, _ in CASES} == set(STRATEGIES)


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}-{json.dumps(o)}" for n, o in CASES])
def test_strategy_matches_reference_over_two_rounds(tmp_path, name, options):
    """Two rounds, the first candidate promoted, so stateful strategies carry their moments."""
    from fedbucket import open_store

    store = open_store((tmp_path / "bucket").as_uri(), create=True)
    base = random_model(0)
    state: dict = {}
    for round_no, round_id in enumerate(("r1", "r2")):
        deltas, examples = client_deltas(5, seed=100 + 10 * round_no)
        setup_round(store, tmp_path, deltas, examples, round_id=round_id)
        report = run_aggregation(store, round_id, build_strategy(name, options), shard_elements=17)
        assert report.status == "aggregated"
        expected, state = reference(base, deltas, examples, name, options, state)
        got = candidate(store, round_id)
        for k in expected:
            assert got[k].dtype == expected[k].dtype and got[k].shape == expected[k].shape
            np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-7, err_msg=f"{round_id} {k}")
        promote_candidate(store, round_id)
        base = expected


def test_bit_identical_whatever_the_sharding(tmp_path):
    from fedbucket import open_store

    results = set()
    for shard_elements in (1, 5, 37, 1000, None):
        store = open_store((tmp_path / f"b{shard_elements}").as_uri(), create=True)
        setup_round(store, tmp_path, *client_deltas(4))
        run_aggregation(store, "r1", build_strategy("fedadam"), shard_elements=shard_elements)
        results.add(store.get_bytes(LAYOUT.candidate_payload("r1"))[0])
        results.add(store.get_bytes(LAYOUT.strategy_state("r1"))[0])
    assert len(results) == 2  # one candidate, one state: the same bytes for every shard size


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_rejected_updates_do_not_change_the_result(tmp_path, strategy):
    """Validation and aggregation share one pass: a NaN update that passed the close is combined
    before its check fails; the shards are then combined again without it, and the candidate
    (and optimiser state) are the bytes of a round that never had it. Nothing half-written stays."""
    from fedbucket import open_store
    from fedbucket.sim.simulation import _hostile_payload, _write_raw_update

    deltas, examples = client_deltas(3)
    clean = open_store((tmp_path / "clean").as_uri(), create=True)
    setup_round(clean, tmp_path, deltas, examples)
    assert run_aggregation(clean, "r1", build_strategy(strategy), shard_elements=7).engine["passes"] == 1

    dirty = open_store((tmp_path / "dirty").as_uri(), create=True)
    task = setup_round(dirty, tmp_path, deltas, examples)
    rng = np.random.default_rng(0)
    for attack in ("nan", "wrong_shape", "pickle", "truncated"):
        _write_raw_update(dirty, task, f"z-{attack.replace('_', '-')}", _hostile_payload(attack, task, rng), 10**6)
    report = run_aggregation(dirty, "r1", build_strategy(strategy), shard_elements=7)
    rejected = {v.client_id: v.code for v in report.updates if not v.accepted}
    assert set(rejected.values()) == {"non_finite", "schema_mismatch", "malformed_payload"}
    assert len(rejected) == 4
    assert report.engine["passes"] == 2 and "recompute_s" in report.timings  # the NaN one was combined first
    names = [LAYOUT.candidate_payload("r1")] + ([LAYOUT.strategy_state("r1")] if strategy == "fedadam" else [])
    for name in names:
        assert dirty.get_bytes(name)[0] == clean.get_bytes(name)[0], name
    assert not [p for p in (tmp_path / "dirty").rglob(".*assembly*")]


def test_a_payload_replaced_after_the_close_is_rejected_and_the_rest_aggregated(tmp_path):
    """Everything reads the updates as the close pinned them; one replaced since then cannot be read
    (its generation moved): it is rejected with a code and never combined."""
    from fedbucket import open_store

    deltas, examples = client_deltas(3)
    clean = open_store((tmp_path / "clean").as_uri(), create=True)
    setup_round(clean, tmp_path, {k: deltas[k] for k in ("c0", "c1")}, examples)
    run_aggregation(clean, "r1", build_strategy("fedavg"))

    store = open_store((tmp_path / "b").as_uri(), create=True)
    task = setup_round(store, tmp_path, deltas, examples)
    freeze_round(store, task, reason="quorum", closed_at=utcnow())
    manifest, _ = read_document(store, LAYOUT.update_manifest("c2", "r1"), UpdateManifest)
    payload = LAYOUT.update_payload("c2", "r1", manifest.sha256)
    store.put_bytes(payload, store.get_bytes(payload)[0])  # same bytes, a new generation
    report = run_aggregation(store, "r1", build_strategy("fedavg"), shard_elements=11)
    verdicts = {v.client_id: v for v in report.updates}
    assert not verdicts["c2"].accepted and verdicts["c2"].code == "malformed_payload"
    assert "no longer the one present when the round closed" in verdicts["c2"].reason
    assert report.status == "aggregated"
    assert store.get_bytes(LAYOUT.candidate_payload("r1"))[0] == clean.get_bytes(LAYOUT.candidate_payload("r1"))[0]


def test_one_pass_below_quorum_releases_nothing(tmp_path):
    """The shards were combined while the checks ran; when the checks leave too few, the
    half-assembled candidate is dropped, not committed."""
    from fedbucket import open_store
    from fedbucket.sim.simulation import _hostile_payload, _write_raw_update

    deltas, examples = client_deltas(2)
    store = open_store((tmp_path / "b").as_uri(), create=True)
    task = setup_round(store, tmp_path, deltas, examples)
    _write_raw_update(store, task, "z-nan", _hostile_payload("nan", task, np.random.default_rng(0)), 10**6)
    report = run_aggregation(store, "r1", build_strategy("fedavg"), min_clients=3)
    assert report.status == "below_quorum" and "validate_and_aggregate_s" in report.timings
    assert not store.exists(LAYOUT.candidate_payload("r1"))
    assert not [p for p in (tmp_path / "b").rglob(".*assembly*")]


def test_robust_strategies_resist_a_poisoned_update(tmp_path):
    """Five honest clients agree on a delta of about +0.01; one sends -1000x that (finite)."""
    from fedbucket import open_store

    rng = np.random.default_rng(7)
    honest = {k: v for k, v in random_model(0).items()}
    deltas, examples = {}, {}
    for i in range(5):
        deltas[f"h{i}"] = {
            k: (np.full(v.shape, 0.01) + 0.001 * rng.standard_normal(v.shape)).astype(v.dtype)
            if v.dtype.kind == "f"
            else np.array(1, v.dtype)
            for k, v in honest.items()
        }
        examples[f"h{i}"] = 10
    deltas["mallory"] = {k: (v * -1000).astype(v.dtype) for k, v in deltas["h0"].items()}
    examples["mallory"] = 50  # claims many examples to weigh more
    base = random_model(0)

    def shift(name, options):
        store = open_store((tmp_path / f"{name}-{len(options)}").as_uri(), create=True)
        setup_round(store, tmp_path, deltas, examples)
        run_aggregation(store, "r1", build_strategy(name, options))
        got = candidate(store)
        return np.mean(np.concatenate([(got[k] - base[k]).ravel() for k in base if base[k].dtype.kind == "f"]))

    assert shift("fedavg", {}) < -1  # plain FedAvg is dragged far off (about -5)
    for name, options in (("fedmedian", {}), ("fedtrimmedavg", {"beta": 0.2})):
        assert shift(name, options) == pytest.approx(0.01, abs=0.002), name
    assert abs(shift("fedavg", {"clip_norm": 0.1})) < 0.02  # norm bounding caps the attacker's pull


def test_below_quorum_writes_a_report_and_no_candidate(tmp_path):
    from fedbucket import open_store

    store = open_store((tmp_path / "b").as_uri(), create=True)
    deltas, examples = client_deltas(2)
    setup_round(store, tmp_path, deltas, examples)
    report = run_aggregation(store, "r1", build_strategy("fedavg"), min_clients=3)
    assert report.status == "below_quorum" and "fewer than the quorum of 3" in report.message
    assert not store.exists(LAYOUT.candidate_payload("r1"))
    stored, _ = read_document(store, LAYOUT.aggregation_report("r1"), AggregationReport)
    assert stored.status == "below_quorum" and len(stored.updates) == 2


def test_frozen_closing_decides_what_is_aggregated(tmp_path):
    """Updates committed after the round was frozen are not aggregated, even if on time."""
    from fedbucket import open_store

    store = open_store((tmp_path / "b").as_uri(), create=True)
    deltas, examples = client_deltas(3)
    task = setup_round(store, tmp_path, {k: deltas[k] for k in ("c0", "c1")}, examples)
    freeze_round(store, task, reason="quorum", closed_at=utcnow())
    path = tmp_path / "c2.safetensors"
    path.write_bytes(tensors_to_bytes(deltas["c2"]))
    upload_update(store, task, "c2", path, num_examples=examples["c2"])
    report = run_aggregation(store, "r1", build_strategy("fedavg"))
    assert [v.client_id for v in report.updates] == ["c0", "c1"]


def test_late_updates_are_reported_not_aggregated(tmp_path):
    from fedbucket import open_store

    store = open_store((tmp_path / "b").as_uri(), create=True)
    deltas, examples = client_deltas(3)
    task = setup_round(store, tmp_path, deltas, examples)
    # move the deadline before the commits: every update is now late except none
    late_task = task.model_copy(update={"deadline": utcnow() - timedelta(hours=1)})
    store.put_bytes(LAYOUT.round_task("r1"), late_task.to_json_bytes())
    report = run_aggregation(store, "r1", build_strategy("fedavg"), min_clients=1)
    assert report.status == "below_quorum"
    assert {v.code for v in report.updates} == {"late"}


# -- the real job under spark-submit ---------------------------------------------------------------


def spark_submit(store_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
    }
    command = [
        str(Path(sys.executable).parent / "spark-submit"),
        "--master",
        "local[2]",
        "--conf",
        "spark.ui.enabled=false",
        str(REPO / "spark_jobs" / "aggregate.py"),
        "--bucket",
        store_url,
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.spark
def test_spark_submit_job_matches_in_process_result(store, store_url, tmp_path):
    deltas, examples = client_deltas(4)
    setup_round(store, tmp_path, deltas, examples)
    run_aggregation(store, "r1", build_strategy("fedavgm"), shard_elements=20)
    serial = store.get_bytes(LAYOUT.candidate_payload("r1"))[0]
    serial_manifest = store.get_bytes(LAYOUT.candidate_manifest("r1"))[0]

    run = spark_submit(store_url, "--round", "r1", "--strategy", "fedavgm", "--shard-elements", "9")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert store.get_bytes(LAYOUT.candidate_payload("r1"))[0] == serial  # same bytes, other engine & sharding
    assert store.get_bytes(LAYOUT.candidate_manifest("r1"))[0] == serial_manifest
    report, _ = read_document(store, LAYOUT.aggregation_report("r1"), AggregationReport)
    assert report.engine["spark_version"].split(".")[0] in {"3", "4"} and report.engine["shards"] > 1
    manifest, _ = read_document(store, LAYOUT.candidate_manifest("r1"), ModelManifest)
    assert manifest.base_version == "init" and len(manifest.lineage["accepted"]) == 4

    below = spark_submit(store_url, "--round", "r1", "--min-clients", "5")
    assert below.returncode == 3, below.stdout[-3000:] + below.stderr[-3000:]
    assert "fewer than the quorum of 5" in below.stdout
    bad = spark_submit(store_url, "--round", "r1", "--strategy", "fedmagic")
    assert bad.returncode == 2 and "unknown strategy" in bad.stdout
    out = tmp_path / "candidate.safetensors"
    store.download_file(LAYOUT.candidate_payload("r1"), out)
    from safetensors.numpy import load_file

    assert set(load_file(str(out))) == set(ODD_SHAPES)
