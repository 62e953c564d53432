"""Client SDK figures: SDK overhead on a 268 MB state dict, and one simulated round of digits.

1. Against fake-gcs-server: a raw google-cloud-storage upload + download of a DistilBERT-sized
   safetensors file, versus the SDK's ``fetch_model`` (download + sha256 check + load) plus
   ``submit`` (delta + local validation + upload + manifest) of the same state dict, alternated in
   each repeat. Where the SDK's time goes is read from its own progress reports: each phase runs
   from its first report to the next phase's first report or the end of its call (so "upload"
   includes the server committing the object, and the manifest); "other" is the rest (round
   checks, loading the cached base before the delta).
2. Ten simulated clients (separate processes, real PyTorch training, Dirichlet(0.5)) in one round:
   wall time from opening the round to the tenth committed update, process start included.

Run: ``make bench`` (or ``python -m tests.benchmarks.bench_client``). Writes docs/benchmarks/client.json.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from fedbucket import Client, ModelSpec, TrainingConfig, open_store
from fedbucket.protocol.documents import utcnow
from fedbucket.protocol.tensors import save_tensors
from fedbucket.protocol.validation import list_update_manifests
from fedbucket.server.rounds import open_round, publish_model, publish_model_file, set_current_model
from fedbucket.sim.emulator import FakeGCSServer
from fedbucket.sim.simulation import SimulationConfig, simulate
from fedbucket.torch.task import build_model
from fedbucket.torch.training import state_dict_to_numpy
from tests.benchmarks.distilbert import NUM_PARAMETERS, random_state

OUT = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "client.json"
REPEATS = 5


class PhaseClock:
    """Seconds per SDK phase, from the progress callback (see the module docstring)."""

    def __init__(self) -> None:
        self.starts: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        self.starts.setdefault(phase, now)
        self.last[phase] = now

    def durations(self, call_ends: list[float]) -> dict[str, float]:
        """Each phase until the next one starts or the call it belongs to returns, whichever is first."""
        order = sorted(self.starts, key=self.starts.__getitem__)
        ends = {}
        for i, phase in enumerate(order):
            candidates = [t for t in call_ends if t >= self.last[phase]]
            if i + 1 < len(order):
                candidates.append(self.starts[order[i + 1]])
            ends[phase] = min(candidates)
        return {phase: ends[phase] - self.starts[phase] for phase in order}


def sdk_overhead(tmp: Path) -> dict[str, object]:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    base = random_state(0)
    trained = {k: v + 0.001 for k, v in base.items()}
    model_file = tmp / "base.safetensors"
    save_tensors(base, model_file)
    size = model_file.stat().st_size
    raw_times, raw_up, raw_down, sdk_fetch, sdk_submit = [], [], [], [], []
    phases: list[dict[str, float]] = []
    with FakeGCSServer(buckets=["bench"]) as gcs:
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.endpoint
        raw_bucket = storage.Client(project="bench", credentials=AnonymousCredentials()).bucket("bench")
        for i in range(REPEATS):
            t0 = time.perf_counter()
            blob = raw_bucket.blob(f"raw/{i}.safetensors")
            blob.upload_from_filename(str(model_file))
            t1 = time.perf_counter()
            blob.download_to_filename(str(tmp / "raw-back.safetensors"))
            t2 = time.perf_counter()
            raw_times.append(t2 - t0)
            raw_up.append(t1 - t0)
            raw_down.append(t2 - t1)

            store = open_store(f"gs://bench/sdk-{i}")
            manifest = publish_model_file(store, model_file, version="init", model=ModelSpec(name="distilbert"))
            set_current_model(store, manifest, expected_generation=0)
            task = open_round(
                store, round_id="r1", opened_at=utcnow(), deadline_seconds=3600, training=TrainingConfig()
            )
            clock = PhaseClock()
            with Client(store.url, "bench-client", cache_dir=tmp / f"cache-{i}") as client:
                t0 = time.perf_counter()
                client.fetch_model(task, as_numpy=True, progress=clock)
                t1 = time.perf_counter()
                client.submit(task, trained, num_examples=1, progress=clock)
                t2 = time.perf_counter()
            sdk_fetch.append(t1 - t0)
            sdk_submit.append(t2 - t1)
            phase = clock.durations([t1, t2])
            phase["other"] = (t2 - t0) - sum(phase.values())
            phases.append(phase)
            print(
                f"  repeat {i}: raw {raw_times[-1]:.2f}s (up {raw_up[-1]:.2f} + down {raw_down[-1]:.2f}), "
                f"sdk {t2 - t0:.2f}s (" + ", ".join(f"{k} {v:.2f}" for k, v in phase.items()) + ")"
            )
    raw = statistics.median(raw_times)
    sdk_totals = [f + s for f, s in zip(sdk_fetch, sdk_submit, strict=True)]
    sdk = statistics.median(sdk_totals)
    return {
        "parameters": NUM_PARAMETERS,
        "bytes": size,
        "repeats": REPEATS,
        "raw_upload_download_s": raw_times,
        "raw_upload_s": raw_up,
        "raw_download_s": raw_down,
        "sdk_fetch_s": sdk_fetch,
        "sdk_submit_s": sdk_submit,
        "sdk_phases_s": phases,
        "median_raw_s": raw,
        "median_raw_upload_s": statistics.median(raw_up),
        "median_raw_download_s": statistics.median(raw_down),
        "median_sdk_s": sdk,
        "median_sdk_phases_s": {k: statistics.median(p[k] for p in phases) for k in phases[0]},
        # per repeat, raw and SDK measured back to back: less exposed to load that comes and goes
        "median_ratio_per_repeat": statistics.median(s / r for s, r in zip(sdk_totals, raw_times, strict=True)),
        "ratio_sdk_over_raw": sdk / raw,
    }


def simulated_round(tmp: Path, clients: int = 10) -> dict[str, object]:
    store = open_store((tmp / "sim-bucket").as_uri(), create=True)
    spec = ModelSpec(name="mlp", kwargs={"hidden": 64})
    manifest = publish_model(store, state_dict_to_numpy(build_model(spec, seed=0)), version="init", model=spec)
    set_current_model(store, manifest, expected_generation=0)
    config = SimulationConfig(
        bucket_url=store.url, clients=clients, rounds=1, poll_interval=0.2, cache_dir=str(tmp / "c")
    )
    runner = threading.Thread(target=simulate, args=(config,), kwargs={"echo": lambda line: None})
    t0 = time.perf_counter()
    runner.start()
    open_round(store, round_id="r1", opened_at=utcnow(), deadline_seconds=600, training=TrainingConfig(local_epochs=2))
    while len(list_update_manifests(store, "r1").names) < clients:
        time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    runner.join()
    return {"clients": clients, "local_epochs": 2, "seconds_to_all_updates": elapsed}


def main() -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        print(f"SDK overhead on a {NUM_PARAMETERS:,}-parameter state dict against fake-gcs-server:")
        overhead = sdk_overhead(Path(tmp))
        print(
            f"  median raw upload+download {overhead['median_raw_s']:.2f}s, SDK fetch+submit "
            f"{overhead['median_sdk_s']:.2f}s, ratio {overhead['ratio_sdk_over_raw']:.2f}"
        )
        print("one round of 10 simulated clients on digits:")
        sim = simulated_round(Path(tmp))
        print(f"  {sim['seconds_to_all_updates']:.1f}s from round open to the 10th update (process start included)")
    result = {"sdk_overhead": overhead, "simulated_round": sim}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
