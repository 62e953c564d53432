"""A simulated federation of real PyTorch clients, judged by the server-side validator.

Rounds open only once every client process has said it is ready (torch imported, data loaded), so
the deadline covers one small training step of a warm client (well under a second here), not
process start-up; every other wait is on an event (a manifest appearing) with a generous bound.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from fedbucket import TrainingConfig, UpdateRejected, validate_update
from fedbucket.protocol.documents import ModelSpec, utcnow
from fedbucket.protocol.validation import list_update_manifests
from fedbucket.server.rounds import open_round, publish_model, set_current_model
from fedbucket.sim.datasets import partition
from fedbucket.sim.simulation import SimulationConfig, simulate
from fedbucket.torch.digits import digits
from fedbucket.torch.task import build_model
from fedbucket.torch.training import state_dict_to_numpy

#: Seconds warmed-up clients get to train on ~240 digits and submit (they take well under one).
DEADLINE_SECONDS = 15
#: Bound on every wait for an event (generous: a busy shared machine).
EVENT_TIMEOUT = 600


def test_dirichlet_partition_is_non_iid_and_deterministic():
    train, _ = digits()
    parts = partition(train.y, 10, scheme="dirichlet", alpha=0.5, seed=3)
    again = partition(train.y, 10, scheme="dirichlet", alpha=0.5, seed=3)
    assert all((a == b).all() for a, b in zip(parts, again, strict=True))
    assert sorted(i for p in parts for i in p) == list(range(len(train.y)))  # a partition: each example once
    iid = partition(train.y, 10, scheme="iid", seed=3)
    assert max(len(p) for p in iid) - min(len(p) for p in iid) <= 1

    def dominant_share(parts):  # mean share of each client's most frequent class
        return sum(max((train.y[p] == c).mean() for c in range(10)) for p in parts) / len(parts)

    # Skewed label mixes (non-IID), on average over seeds: one draw of Dirichlet(0.5) can be mild.
    seeds = range(5)
    dirichlet = [dominant_share(partition(train.y, 10, scheme="dirichlet", alpha=0.5, seed=s)) for s in seeds]
    even = [dominant_share(partition(train.y, 10, scheme="iid", seed=s)) for s in seeds]
    assert np.mean(dirichlet) > 2 * np.mean(even)


def wait_for(condition, what: str) -> None:
    stop = time.monotonic() + EVENT_TIMEOUT
    while not condition():
        assert time.monotonic() < stop, f"timed out after {EVENT_TIMEOUT} s waiting for {what}"
        time.sleep(0.2)


def test_simulated_clients_train_and_the_validator_judges_them(store, store_url, tmp_path):
    spec = ModelSpec(name="mlp", kwargs={"hidden": 32})
    manifest = publish_model(store, state_dict_to_numpy(build_model(spec, seed=0)), version="init", model=spec)
    set_current_model(store, manifest, expected_generation=0)
    config = SimulationConfig(
        bucket_url=store_url,
        clients=6,
        rounds=2,
        dropout=1 / 6,
        stragglers=1,
        hostile=1,
        poll_interval=0.2,
        round_timeout=EVENT_TIMEOUT,
        cache_dir=str(tmp_path / "cache"),
    )
    roles = config.roles()
    assert list(roles.values()).count("honest") == 3
    lines: list[str] = []
    ready: set[str] = set()
    outcome = {}
    runner = threading.Thread(
        target=lambda: outcome.setdefault("summary", simulate(config, echo=lines.append, on_ready=ready.add))
    )
    runner.start()
    wait_for(lambda: len(ready) == config.clients, "every client process to start")
    verdicts = {}
    for round_id in ("sim-1", "sim-2"):
        task = open_round(
            store,
            round_id=round_id,
            opened_at=utcnow(),
            deadline_seconds=DEADLINE_SECONDS,
            training=TrainingConfig(local_epochs=1, batch_size=16, learning_rate=0.05),
            max_update_norm=1000.0,
        )
        # 3 honest + hostile + straggler (who submits just after the deadline); the dropout never writes
        wait_for(lambda: len(list_update_manifests(store, round_id).names) == 5, f"5 manifests in {round_id}")  # noqa: B023
        for name in list_update_manifests(store, round_id).names:
            client_id = name.split("/")[1]
            try:
                validate_update(store, task, name)
                verdicts[(round_id, client_id)] = "accepted"
            except UpdateRejected as exc:
                verdicts[(round_id, client_id)] = exc.code
    runner.join(timeout=EVENT_TIMEOUT)
    assert not runner.is_alive()
    summary = outcome["summary"]
    for round_id in ("sim-1", "sim-2"):
        got = {cid: verdicts.get((round_id, cid)) for cid, role in roles.items()}
        for cid, role in roles.items():
            if role == "honest":
                assert got[cid] == "accepted", (round_id, cid, got)
            elif role == "dropout":
                assert got[cid] is None
            elif role == "straggler":
                assert got[cid] == "late"
            else:
                assert got[cid] in {"schema_mismatch", "non_finite", "norm_too_large", "malformed_payload"}
    counts = summary.counts()
    assert counts["submitted"] == 6 and counts["late"] == 2 and counts["dropped"] == 2 and counts["hostile"] == 2
    assert counts.get("error", 0) == 0, [r.line() for r in summary.results if r.outcome == "error"]
    honest_lines = [r for r in summary.results if r.outcome == "submitted"]
    assert all(r.num_examples > 0 and 0 <= r.accuracy <= 1 for r in honest_lines)
    assert sum(line.endswith(" ready") for line in lines) == config.clients
    assert any("trained on" in line for line in lines) and lines[-1].startswith("simulation:")
