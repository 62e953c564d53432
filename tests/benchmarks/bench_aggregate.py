"""Aggregation benchmark: N DistilBERT-sized updates (66,955,010 float32 parameters each).

Generates N updates into a local federation (file://), then for each N times, side by side:

(a) the Spark job end to end: ``spark-submit --master local[*] spark_jobs/aggregate.py``;
(b) the Spark aggregation alone, session already up: the same run's own timing of
    ``run_aggregation`` (validate + aggregate + write), without JVM and session start;
(c) the floor: one process, numpy, streaming every update once in 16 MiB pieces into a float64
    accumulator (no validation), then writing the result;
(d) "load every update, then average", as most FL frameworks do (Flower's ``aggregate``:
    weight every layer of every model, then sum), skipped where it would need more than
    ``--max-memory-gb``.

Each is run ``--repeats`` times, the approaches alternating within each repeat, in a subprocess
whose process tree is sampled for the peak RSS of its largest process. Medians are reported. Run
with ``make bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import reduce
from pathlib import Path

import numpy as np

from fedbucket import LAYOUT, ModelSpec, TrainingConfig, open_store
from fedbucket.protocol.documents import (
    AggregationReport,
    RoundClosing,
    RoundTask,
    UpdateManifest,
    read_document,
    utcnow,
    write_document,
)
from fedbucket.protocol.tensors import read_header_file, tensors_to_bytes
from fedbucket.protocol.validation import precheck_update, read_update_manifest
from fedbucket.server.rounds import open_round, publish_model, set_current_model
from tests.benchmarks.distilbert import NUM_PARAMETERS, distilbert_shapes, random_state

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "benchmarks" / "aggregate.json"
MODEL_BYTES = NUM_PARAMETERS * 4
ROUND = "bench"
# The prototype's report (../shared/notes/prior-prototype.md): 1 master + 4 e2-standard-2 workers.
PROTOTYPE_SECONDS = {2: 18.6, 4: 27.5, 8: 39.3, 16: 83.8, 32: 100.8, 64: 200, 128: 383, 256: 1650}


# -- data ------------------------------------------------------------------------------------------


def generate(root: Path, n_max: int) -> None:
    """A federation with a DistilBERT-shaped base model and ``n_max`` updates in round ``bench``
    (updates already there are kept: a larger N only adds the missing ones)."""
    store = open_store(root.as_uri(), create=True)
    if not store.exists(LAYOUT.current_model):
        manifest = publish_model(store, random_state(0), version="init", model=ModelSpec(name="distilbert"))
        set_current_model(store, manifest, expected_generation=0)
    task = open_round(
        store, round_id=ROUND, opened_at=utcnow(), deadline_seconds=10**6, training=TrainingConfig(), min_clients=1
    )
    missing = [i for i in range(n_max) if not store.exists(LAYOUT.update_manifest(f"client-{i:03d}", ROUND))]
    if not missing:
        return
    seeds = [random_state(100 + s, scale=1e-3) for s in range(4)]
    t0 = time.perf_counter()
    for done, i in enumerate(missing, 1):
        delta = {k: v * np.float32(1 + i / 64) for k, v in seeds[i % 4].items()}
        payload = tensors_to_bytes(delta)
        sha = hashlib.sha256(payload).hexdigest()
        client = f"client-{i:03d}"
        store.put_bytes(LAYOUT.update_payload(client, ROUND, sha), payload)
        update = UpdateManifest(
            client_id=client,
            round_id=ROUND,
            base_model_version=task.base_model_version,
            num_examples=100 + i,
            sha256=sha,
            size_bytes=len(payload),
            created_at=utcnow(),
        )
        store.put_bytes(LAYOUT.update_manifest(client, ROUND), update.to_json_bytes())
        print(f"  generated update {done}/{len(missing)} ({time.perf_counter() - t0:.0f}s)", end="\r", flush=True)
    print()


def delete_updates(root: Path, first: int) -> None:
    """Delete the generated updates from index ``first`` on (the large-N run's extra disk)."""
    store = open_store(root.as_uri())
    i = first
    while names := [info.name for info in store.list(LAYOUT.update_prefix(f"client-{i:03d}", ROUND))]:
        for name in names:
            store.delete(name)
        i += 1


def select_clients(root: Path, n: int) -> None:
    """Freeze the round with its first ``n`` updates (what the DAG's wait step would write)."""
    store = open_store(root.as_uri())
    task, _ = read_document(store, LAYOUT.round_task(ROUND), RoundTask)
    updates = []
    for i in range(n):
        name = LAYOUT.update_manifest(f"client-{i:03d}", ROUND)
        manifest, committed_at = read_update_manifest(store, name)
        updates.append(precheck_update(store, task, manifest, committed_at))
    closing = RoundClosing(round_id=ROUND, closed_at=utcnow(), reason="quorum", updates=updates)
    write_document(store, LAYOUT.round_closing(ROUND), closing)


def payload_paths(root: Path, n: int) -> list[tuple[Path, int]]:
    store = open_store(root.as_uri())
    out = []
    for i in range(n):
        manifest, _ = read_document(store, LAYOUT.update_manifest(f"client-{i:03d}", ROUND), UpdateManifest)
        out.append((root / LAYOUT.update_payload(manifest.client_id, ROUND, manifest.sha256), manifest.num_examples))
    return out


# -- (c) and (d): single-process baselines, run as subprocesses ------------------------------------


def numpy_floor(root: Path, n: int, output: Path) -> None:
    sources = payload_paths(root, n)
    header = read_header_file(sources[0][0])
    total = sum(w for _, w in sources)
    acc = np.zeros(NUM_PARAMETERS, dtype=np.float64)
    tmp = np.empty(4 * 1024 * 1024, dtype=np.float64)
    start = header.data_start
    for path, weight in sources:
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            position = 0
            while chunk := f.read(16 * 1024 * 1024):
                values = np.frombuffer(chunk, dtype=np.float32)
                part = tmp[: len(values)]
                np.multiply(values, weight / total, out=part)
                acc[position : position + len(values)] += part
                position += len(values)
    with open(output, "wb") as f:
        f.write(header.header_bytes)
        f.write(acc.astype(np.float32).tobytes())


def load_all_then_average(root: Path, n: int, output: Path) -> None:
    from safetensors.numpy import load_file, save_file

    sources = payload_paths(root, n)
    models = [(load_file(str(path)), weight) for path, weight in sources]
    total = sum(w for _, w in models)
    names = list(models[0][0])
    weighted = [[model[name] * weight for name in names] for model, weight in models]  # Flower's aggregate()
    averaged = [reduce(np.add, layers) / total for layers in zip(*weighted, strict=True)]
    save_file(dict(zip(names, averaged, strict=True)), str(output))


# -- measurement -------------------------------------------------------------------------------------


def measure(command: list[str], env: dict[str, str]) -> tuple[float, int, subprocess.CompletedProcess]:
    """Wall seconds and the peak RSS (bytes) of the largest process in the command's tree."""
    import psutil

    peak = 0
    t0 = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()
    output: dict[str, str] = {}

    def reader() -> None:
        output["out"], output["err"] = process.communicate()
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    root = psutil.Process(process.pid)
    while not done.wait(0.05):
        try:
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    peak = max(peak, proc.memory_info().rss)
        except psutil.Error:
            pass
    elapsed = time.perf_counter() - t0
    return elapsed, peak, subprocess.CompletedProcess(command, process.returncode, output["out"], output["err"])


def run(args: argparse.Namespace) -> dict:
    root = Path(args.data_dir)
    n_max = max(args.n)
    print(f"generating {n_max} DistilBERT-sized updates in {root} ({n_max * MODEL_BYTES / 1e9:.1f} GB)")
    generate(root, n_max)
    env = {
        **os.environ,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYTHONPATH": str(REPO),
    }
    spark_submit = str(Path(sys.executable).parent / "spark-submit")
    results = []
    for n in args.n:
        select_clients(root, n)
        row: dict = {"n": n, "update_bytes": n * MODEL_BYTES}
        approaches = ["spark_e2e", "numpy_floor"]
        if 2 * n * MODEL_BYTES > args.max_memory_gb * 1e9:
            row["load_all"] = {"skipped": f"needs ~{2 * n * MODEL_BYTES / 1e9:.0f} GB (> {args.max_memory_gb} GB)"}
        else:
            approaches.append("load_all")
        measured: dict[str, dict[str, list]] = {a: {"times": [], "peaks": [], "inner": []} for a in approaches}
        for _ in range(args.repeats):  # alternating: every approach sees the same machine and page cache
            for approach in approaches:
                with tempfile.TemporaryDirectory() as tmp:
                    if approach == "spark_e2e":
                        command = [
                            spark_submit, "--master", "local[*]", "--driver-memory", "1g",
                            "--conf", "spark.ui.enabled=false",
                            str(REPO / "spark_jobs" / "aggregate.py"), "--bucket", root.as_uri(), "--round", ROUND,
                        ]  # fmt: skip
                    else:
                        command = [
                            sys.executable, "-m", "tests.benchmarks.bench_aggregate", approach,
                            "--data-dir", str(root), "--n", str(n), "--output", str(Path(tmp) / "out.safetensors"),
                        ]  # fmt: skip
                    seconds, peak, done = measure(command, env)
                if done.returncode != 0:
                    raise RuntimeError(f"{approach} N={n} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
                measured[approach]["times"].append(seconds)
                measured[approach]["peaks"].append(peak)
                if approach == "spark_e2e":
                    report, _ = read_document(
                        open_store(root.as_uri()), LAYOUT.aggregation_report(ROUND), AggregationReport
                    )
                    measured[approach]["inner"].append(report.timings)
        for approach, m in measured.items():
            row[approach] = {
                "seconds": m["times"],
                "median_s": statistics.median(m["times"]),
                "peak_rss_bytes": max(m["peaks"]),
            }
            if inner := m["inner"]:
                row["spark_inner"] = {
                    "seconds": [t["total_s"] for t in inner],
                    "median_s": statistics.median(t["total_s"] for t in inner),
                    "phases_median_s": {
                        k: statistics.median(t.get(k, 0.0) for t in inner)
                        for k in sorted({k for t in inner for k in t} - {"total_s"})
                    },
                }
        results.append(row)
        summary = ", ".join(
            f"{k} {row[k]['median_s']:.1f}s"
            for k in ("spark_e2e", "spark_inner", "numpy_floor", "load_all")
            if "median_s" in row.get(k, {})
        )
        print(f"N={n:3d}: {summary}")
    data = {
        "model_parameters": NUM_PARAMETERS,
        "model_bytes": MODEL_BYTES,
        "tensors": len(distilbert_shapes()),
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "results": results,
        "prototype_seconds": PROTOTYPE_SECONDS,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=2) + "\n")
    plot(data, REPO / "docs" / "benchmarks" / "aggregate.png")
    return data


SCALE_OUT = REPO / "docs" / "benchmarks" / "aggregate_scale.json"


def run_scale(args: argparse.Namespace) -> dict:
    """The marginal cost of one more update: N = 64 against N = ``args.n_big`` (generated for the
    run, deleted after it), the Spark job end to end and the numpy floor, alternating."""
    import shutil

    root = Path(args.data_dir)
    small, big = 64, args.n_big
    generate(root, small)
    needed = (big - small) * MODEL_BYTES * 1.05
    free = shutil.disk_usage(root).free
    if free < needed:
        data = {"skipped": f"N = {big} needs {needed / 1e9:.0f} GB more disk; {free / 1e9:.0f} GB free"}
        SCALE_OUT.write_text(json.dumps(data, indent=2) + "\n")
        print(data["skipped"])
        return data
    print(f"generating updates {small}..{big - 1} ({(big - small) * MODEL_BYTES / 1e9:.1f} GB more)")
    generate(root, big)
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": str(REPO)}  # fmt: skip
    spark_submit = str(Path(sys.executable).parent / "spark-submit")
    rows: dict[int, dict[str, list]] = {
        n: {"spark_e2e": [], "spark_inner": [], "numpy_floor": [], "rss": []} for n in (small, big)
    }
    try:
        for repeat in range(args.repeats):
            for n in (small, big):
                select_clients(root, n)
                with tempfile.TemporaryDirectory() as tmp:
                    spark = [spark_submit, "--master", "local[*]", "--driver-memory", "1g",
                             "--conf", "spark.ui.enabled=false", str(REPO / "spark_jobs" / "aggregate.py"),
                             "--bucket", root.as_uri(), "--round", ROUND]  # fmt: skip
                    out = str(Path(tmp) / "out.safetensors")
                    floor = [sys.executable, "-m", "tests.benchmarks.bench_aggregate", "numpy_floor",
                             "--data-dir", str(root), "--n", str(n), "--output", out]  # fmt: skip
                    for name, command in (("spark_e2e", spark), ("numpy_floor", floor)):
                        seconds, peak, done = measure(command, env)
                        if done.returncode != 0:
                            raise RuntimeError(f"{name} N={n} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
                        rows[n][name].append(seconds)
                        if name == "spark_e2e":
                            rows[n]["rss"].append(peak)
                            report, _ = read_document(
                                open_store(root.as_uri()), LAYOUT.aggregation_report(ROUND), AggregationReport
                            )
                            rows[n]["spark_inner"].append(report.timings["total_s"])
                last = {k: v[-1] for k, v in rows[n].items()}
                print(f"  repeat {repeat + 1} N={n}: spark {last['spark_e2e']:.1f}s "
                      f"(inner {last['spark_inner']:.1f}s), floor {last['numpy_floor']:.1f}s")  # fmt: skip
    finally:
        delete_updates(root, small)  # generate, measure, delete: 17 GB per 64 updates
        select_clients(root, small)
    medians = {
        n: {k: statistics.median(v) for k, v in r.items() if k != "rss"} | {"peak_rss_bytes": max(r["rss"])}
        for n, r in rows.items()
    }
    data = {
        "n": [small, big],
        "model_bytes": MODEL_BYTES,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "runs": {str(n): r for n, r in rows.items()},
        "medians": {str(n): m for n, m in medians.items()},
        "marginal_s_per_update": {
            k: (medians[big][k] - medians[small][k]) / (big - small)
            for k in ("spark_e2e", "spark_inner", "numpy_floor")
        },
    }
    SCALE_OUT.write_text(json.dumps(data, indent=2) + "\n")
    return data


def render_scale(data: dict) -> str:
    if "skipped" in data:
        return f"### The marginal update\n\nNot measured: {data['skipped']}.\n"
    small, big = data["n"]
    m, marginal = data["medians"], data["marginal_s_per_update"]
    lines = [
        "### The marginal update",
        "",
        f"N = {small} against N = {big} DistilBERT-sized updates ({big * data['model_bytes'] / 1e9:.0f} GB at "
        f"N = {big}, generated for this run and deleted after it), alternating, medians of {data['repeats']} "
        "(`make bench BENCH_ARGS='--only aggregate-scale'`).",
        "",
        "| | N = " + str(small) + " s | N = " + str(big) + " s | marginal s per update | marginal GB/s |",
        "|---|---|---|---|---|",
    ]
    labels = {"spark_e2e": "(a) Spark job end to end", "spark_inner": "(b) validate + aggregate + write",
              "numpy_floor": "(c) numpy floor"}  # fmt: skip
    for key, label in labels.items():
        per = marginal[key]
        lines.append(
            f"| {label} | {m[str(small)][key]:.1f} | {m[str(big)][key]:.1f} | {per:.3f} | "
            f"{data['model_bytes'] / per / 1e9 if per > 0 else float('nan'):.2f} |"
        )
    lines += [
        "",
        f"Peak RSS of the largest process: {m[str(small)]['peak_rss_bytes'] / 1e9:.2f} GB at N = {small}, "
        f"{m[str(big)]['peak_rss_bytes'] / 1e9:.2f} GB at N = {big}.",
        "",
    ]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    proto = data["prototype_seconds"]
    ax.plot(list(map(int, proto)), list(proto.values()), "k--o", label="prototype (5 x e2-standard-2)")
    labels = {
        "spark_e2e": "(a) Spark job, spark-submit end to end",
        "spark_inner": "(b) Spark aggregation, session up",
        "numpy_floor": "(c) numpy streaming floor, 1 process",
        "load_all": "(d) load all then average",
    }
    for key, label in labels.items():
        points = [(r["n"], r[key]["median_s"]) for r in data["results"] if "median_s" in r.get(key, {})]
        if points:
            ax.plot(*zip(*points, strict=True), "-o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("updates averaged (DistilBERT-sized, 268 MB each)")
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"Averaging N DistilBERT updates on {data['cpu_count']} cores vs the prototype")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "scale", "numpy_floor", "load_all"])
    parser.add_argument("--n", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=str(REPO / "bench-data"))
    parser.add_argument("--max-memory-gb", type=float, default=12.0)
    parser.add_argument("--output")
    parser.add_argument("--n-big", type=int, default=128, help="scale: the large N compared with N = 64")
    args = parser.parse_args()
    if args.mode == "numpy_floor":
        numpy_floor(Path(args.data_dir), args.n[0], Path(args.output))
    elif args.mode == "load_all":
        load_all_then_average(Path(args.data_dir), args.n[0], Path(args.output))
    elif args.mode == "scale":
        run_scale(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
