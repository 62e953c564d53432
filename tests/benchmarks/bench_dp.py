"""What differential privacy costs the Spark job: N DistilBERT-sized updates (default 64) aggregated
with FedAvg and with DP-FedAvg (adaptive clipping, keyed AES-CTR noise on every coordinate), side
by side in one run, alternating, ``--repeats`` times each. Uses the aggregation benchmark's data
(``bench-data/``, generated if missing). Writes ``docs/benchmarks/dp.json``; ``make bench`` renders it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
from pathlib import Path

from fedbucket import LAYOUT, open_store
from fedbucket.protocol.documents import AggregationReport, read_document
from tests.benchmarks.bench_aggregate import MODEL_BYTES, ROUND, generate, measure, select_clients
from tests.benchmarks.distilbert import NUM_PARAMETERS

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "benchmarks" / "dp.json"


def run(args: argparse.Namespace) -> dict:
    root = Path(args.data_dir)
    generate(root, args.n)
    select_clients(root, args.n)
    env = {
        **os.environ,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYTHONPATH": str(REPO),
        "FEDBUCKET_DP_KEY": secrets.token_hex(32),  # a fresh secret for the benchmark; never stored
    }
    privacy = json.dumps({"dp": True, "noise_multiplier": 1.0, "expected_clients": args.n, "max_participations": 1000})
    base = [
        str(Path(sys.executable).parent / "spark-submit"), "--master", "local[*]", "--driver-memory", "2g",
        "--conf", "spark.ui.enabled=false", str(REPO / "spark_jobs" / "aggregate.py"),
        "--bucket", root.as_uri(), "--round", ROUND,
    ]  # fmt: skip
    commands = {"fedavg": base, "dp_fedavg": [*base, "--privacy", privacy]}
    measured: dict[str, dict[str, list]] = {k: {"seconds": [], "inner": [], "peak": []} for k in commands}
    for repeat in range(args.repeats):
        for name, command in commands.items():  # alternating: both see the same machine load
            seconds, peak, done = measure(command, env)
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
            report, _ = read_document(open_store(root.as_uri()), LAYOUT.aggregation_report(ROUND), AggregationReport)
            assert (report.privacy is not None) == (name == "dp_fedavg")
            measured[name]["seconds"].append(seconds)
            measured[name]["inner"].append(report.timings)
            measured[name]["peak"].append(peak)
            aggregating = report.timings.get("aggregate_s", report.timings.get("validate_and_aggregate_s", 0.0))
            print(f"  {name} run {repeat + 1}: {seconds:.1f}s end to end, {aggregating:.1f}s aggregating")
    summary = {
        name: {
            "seconds": m["seconds"],
            "median_s": statistics.median(m["seconds"]),
            # FedAvg validates while it aggregates (one pass); DP-FedAvg needs the norms first (two passes)
            "validate_median_s": statistics.median(t.get("validate_s", 0.0) for t in m["inner"]),
            "aggregate_median_s": statistics.median(
                t.get("aggregate_s", t.get("validate_and_aggregate_s", 0.0)) for t in m["inner"]
            ),
            "inner_median_s": statistics.median(t["total_s"] for t in m["inner"]),
            "peak_rss_bytes": max(m["peak"]),
        }
        for name, m in measured.items()
    }
    data = {
        "n": args.n,
        "update_bytes": args.n * MODEL_BYTES,
        "model_parameters": NUM_PARAMETERS,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "results": summary,
        "ratio_end_to_end": summary["dp_fedavg"]["median_s"] / summary["fedavg"]["median_s"],
        "ratio_inner": summary["dp_fedavg"]["inner_median_s"] / summary["fedavg"]["inner_median_s"],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=2) + "\n")
    return data


def render(data: dict) -> str:
    rows = data["results"]
    data.setdefault("ratio_inner", rows["dp_fedavg"]["inner_median_s"] / rows["fedavg"]["inner_median_s"])
    lines = [
        "## Differential privacy in the Spark job",
        "",
        f"N = {data['n']} DistilBERT-sized updates ({data['model_parameters']:,} float32 parameters each), "
        f"`spark-submit --master local[*]`, FedAvg against DP-FedAvg (adaptive clipping, exact norms, keyed "
        f"AES-CTR Gaussian noise on every coordinate, the ledger charged), alternating, medians of "
        f"{data['repeats']} run(s) each, {data['cpu_count']} cores (`python -m tests.benchmarks.run --only dp`).",
        "",
        "| | end to end s | passes over the updates | validate s | aggregate s | validate+aggregate+write s "
        "| peak RSS GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in (("fedavg", "FedAvg"), ("dp_fedavg", "DP-FedAvg")):
        r = rows[name]
        lines.append(
            f"| {label} | {r['median_s']:.1f} | {'1 (checks run beside the shards)' if name == 'fedavg' else '2'} | "
            f"{r['validate_median_s']:.1f} | {r['aggregate_median_s']:.1f} | {r['inner_median_s']:.1f} | "
            f"{r['peak_rss_bytes'] / 1e9:.2f} |"
        )
    lines += [
        "",
        f"DP costs **{data['ratio_end_to_end']:.2f}x** end to end and {data['ratio_inner']:.2f}x inside the job. "
        "FedAvg checks every update in the same Spark stage that combines the shards (one pass); DP-FedAvg cannot: "
        "the exact norm of every update (float64, fixed order: the norm decides the clipping, so a re-run must get "
        "the same bits) must be known before any update is weighted, so it validates first, then aggregates and "
        "draws the noise (16 bytes of AES-CTR keystream and a Box-Muller transform per parameter, in the executors, "
        "each for its own shards).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=str(REPO / "bench-data"))
    print(render(run(parser.parse_args())))


if __name__ == "__main__":
    main()
