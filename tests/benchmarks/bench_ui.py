"""How fast the Federation pages are for a large federation: 1,000 rounds and 1,000 clients
(100 updates per round, every 10th client rejected in a round), written as round reports with the
protocol's documents into a file store, then each page rendered cold (first view: every report
read once) and warm (the cache holds the finished rounds), medians of ``--repeats``.
Writes ``docs/benchmarks/ui.json``; ``make bench`` renders it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fedbucket import LAYOUT, open_store
from fedbucket.protocol.documents import (
    RoundReport,
    RoundTask,
    TensorSpec,
    TrainingConfig,
    UpdateVerdict,
    write_document,
)
from fedbucket.server import report_html
from fedbucket.server.federation import FederationView
from fedbucket.server.report_html import clients_page, models_page, overview_page, round_page

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "benchmarks" / "ui.json"


def write_federation(root: Path, rounds: int, clients: int, per_round: int) -> str:
    url = root.as_uri()
    store = open_store(url, create=True)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for r in range(rounds):
        round_id = f"r{r:04d}"
        opened = start + timedelta(hours=r)
        task = RoundTask(
            round_id=round_id, base_model_version="init", base_model_sha256="0" * 64, model={"name": "mlp"},
            opened_at=opened, deadline=opened + timedelta(minutes=10), training=TrainingConfig(),
            tensors={"w": TensorSpec(dtype="F32", shape=[10])}, max_update_bytes=1000,
        )  # fmt: skip
        write_document(store, LAYOUT.round_task(round_id), task)
        updates = []
        for i in range(per_round):
            client = f"client-{(r * per_round + i) % clients:04d}"
            ok = i % 10
            updates.append(UpdateVerdict(client_id=client, accepted=bool(ok), code="accepted" if ok else "non_finite",
                                         reason="" if ok else "NaN", num_examples=100, weight=0.01))  # fmt: skip
        accuracy = 0.5 + 0.4 * r / rounds
        figures = {"accuracy": accuracy, "macro_f1": accuracy - 0.02, "loss": 2 - accuracy}
        report = RoundReport(
            round_id=round_id, status="promoted", base_model_version="init", message="promoted", updates=updates,
            metrics={"validation": {"candidate": figures, "current": figures}},
        )  # fmt: skip
        write_document(store, LAYOUT.round_report(round_id), report)
    return url


def measure(repeats: int, rounds: int, clients: int, per_round: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        url = write_federation(Path(tmp), rounds, clients, per_round)
        pages = {
            "overview": lambda v: overview_page(v, base="/fedbucket/"),
            "round": lambda v: round_page(v, f"r{rounds - 1:04d}", base="/fedbucket/"),
            "models": lambda v: models_page(v, base="/fedbucket/"),
            "clients": lambda v: clients_page(v, base="/fedbucket/"),
        }
        result = {}
        for name, render in pages.items():
            cold, warm = [], []
            for _ in range(repeats):
                report_html._PLOTS.clear()  # cold: nothing drawn or read yet in this process
                view = FederationView(open_store(url))
                t0 = time.perf_counter()
                render(view)
                cold.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                render(view)
                warm.append(time.perf_counter() - t0)
            result[name] = {"cold_median_s": statistics.median(cold), "warm_median_s": statistics.median(warm)}
            print(f"  {name}: cold {result[name]['cold_median_s']:.2f}s, warm {result[name]['warm_median_s']:.2f}s")
    return result


def run(args: argparse.Namespace) -> dict:
    pages = measure(args.repeats, args.rounds, args.clients, args.per_round)
    data = {"rounds": args.rounds, "clients": args.clients, "updates_per_round": args.per_round,
            "repeats": args.repeats, "pages": pages}  # fmt: skip
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=2) + "\n")
    return data


def render(data: dict) -> str:
    lines = [
        "## The Federation page at scale",
        "",
        f"{data['rounds']:,} rounds, {data['clients']:,} clients, {data['updates_per_round']} updates per round "
        f"(file store), each page rendered by the same code the Airflow plugin serves; cold = a fresh view reading "
        f"every report once, warm = the next view of the same page (finished rounds cached); medians of "
        f"{data['repeats']} (`python -m tests.benchmarks.run --only ui`).",
        "",
        "| page | cold s | warm s |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {p['cold_median_s']:.2f} | {p['warm_median_s']:.2f} |" for name, p in data["pages"].items()]
    lines += [
        "",
        "The overview plots the last 200 rounds and pages its table 50 rounds at a time; the clients page pages "
        "100 clients at a time over the last 100 rounds. Drawn plots are kept per process until a round is added, "
        "so only the first view after a new round draws them (in the cold figures above).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    print(render(run(parser.parse_args())))


if __name__ == "__main__":
    main()
