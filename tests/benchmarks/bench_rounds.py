"""Server overhead of real DAG rounds: many clients in one round, and many cheap rounds.

Every round is one ``dag.test()`` run of ``fedbucket_round`` in its own process
(:func:`fedbucket_airflow.local.run_round`, as ``make rounds`` and the demo run it), with real
Spark (spark-submit, as the DAG runs it) against the file store or fake-gcs-server. Clients are
lightweight: threads in this process that go through the SDK (``Client.fetch_model`` then
``Client.submit`` of the base plus a little noise: no training), all waiting when the round opens.

**Server overhead** of a round = the publish step's duration + the time from the commit of the
round's last update (store clock, from ``closing.json``) to the end of the promote step. It
leaves out the window in which clients fetch, train and upload, and keeps everything the server
adds: noticing the last update, freezing the round, the gaps between steps, the Spark jobs,
promotion. (The report step runs after promotion, as the run's teardown, and is listed apart.)
Every wait ends as soon as all expected clients are in (``max_clients`` = the clients started).

Two scenarios, ``--only`` picks one:

- ``clients``: one round each with 10, 100, 1,000 clients (``--clients``), on each store (``--stores``);
- ``rounds``: ``--rounds`` consecutive rounds (default 20) of ``--round-clients`` clients (default 10)
  on one federation, with the per-round phase breakdown.

Writes ``docs/benchmarks/rounds.json`` and ``docs/benchmarks/rounds.png``; ``make bench`` renders it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "plugins") not in sys.path:  # fedbucket_airflow.local, as `make rounds` imports it
    sys.path.insert(0, str(REPO / "plugins"))
OUT = REPO / "docs" / "benchmarks" / "rounds.json"
PLOT = REPO / "docs" / "benchmarks" / "rounds.png"
BUCKET = "fedbucket-bench"
#: The server steps of the DAG in the order they run (those absent from a DAG are skipped).
STEPS = ("publish", "wait_for_updates", "aggregate", "evaluate", "promote", "report")


def write_config(path: Path, bucket: str, *, clients: int, poll_seconds: float) -> Path:
    """A federation of the built-in digits MLP whose wait ends when all ``clients`` are in."""
    path.write_text(
        "\n".join(
            [
                f'bucket = "{bucket}"',
                'model = { name = "mlp", kwargs = { hidden = 32 } }',
                "retries = 0",
                "",
                "[round]",
                f"deadline_seconds = {max(600, 2 * clients)}",  # generous: the wait ends at max_clients
                f"min_clients = {clients}",  # the wait ends when every client is in (max_clients)
                f"max_clients = {clients}",
                "grace_seconds = 0",
                "settle_seconds = 1",
                f"poll_seconds = {poll_seconds}",
                "",
                "[training]",
                "local_epochs = 1",
                "",
                "[gate]",
                "tolerance = 1.0",  # every candidate passes: promotion always runs
                "",
                "[aggregation]",
                'spark_master = "local[2]"',
                "",
            ]
        )
    )
    return path


class LightClients:
    """``n`` SDK clients on a pool of threads: when round ``round_id`` opens, each fetches the
    base model and submits it plus a little noise. Errors are collected, never raised in a thread."""

    def __init__(self, url: str, n: int, cache: Path, *, workers: int = 24) -> None:
        self.url, self.cache, self.workers = url, cache, workers
        self.ids = [f"c{i:04d}" for i in range(n)]
        self.errors: list[str] = []
        self.committed: list[float] = []
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, round_id: str) -> None:
        self._thread = threading.Thread(target=self._run, args=(round_id,), daemon=True)
        self._thread.start()

    def join(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=600)

    def _run(self, round_id: str) -> None:
        from fedbucket import Client

        with Client(self.url, "watcher", cache_dir=self.cache / "watcher") as watcher:
            task = watcher.current_round()
            while task is None or task.round_id != round_id:
                if self.stop.wait(0.2):
                    self.errors.append(f"round {round_id} never opened")
                    return
                task = watcher.current_round()

        def submit(index: int) -> None:
            client_id = self.ids[index]
            try:
                with Client(self.url, client_id, cache_dir=self.cache / client_id) as client:
                    base = client.fetch_model(task, as_numpy=True)
                    rng = np.random.default_rng(index)
                    trained = {
                        k: (v + rng.normal(0, 0.01, v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v
                        for k, v in base.items()
                    }
                    client.submit(task, trained, num_examples=10 + index % 7)
                    self.committed.append(time.time())
            except Exception as exc:  # reported by the benchmark
                self.errors.append(f"{client_id}: {type(exc).__name__}: {exc}")

        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(submit, range(len(self.ids))))


def _when(text: str | None) -> float | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def task_times(home: Path) -> dict[str, dict]:
    """Start, end and state of every task of the latest DAG run in the local metadata DB."""
    with sqlite3.connect(home / "airflow.db") as db:
        (run_id,) = db.execute("select run_id from dag_run order by id desc limit 1").fetchone()
        rows = db.execute(
            "select task_id, start_date, end_date, state from task_instance where run_id = ?", (run_id,)
        ).fetchall()
    return {t: {"start": _when(s), "end": _when(e), "state": state} for t, s, e, state in rows}


def round_profile(store, round_id: str, tasks: dict[str, dict], run_started: float, run_ended: float) -> dict:
    """The round's overhead and its phases, from the task times and the round's documents."""
    from fedbucket.protocol.documents import AggregationReport, RoundClosing, RoundReport, read_optional
    from fedbucket.protocol.layout import LAYOUT

    closing, _ = read_optional(store, LAYOUT.round_closing(round_id), RoundClosing)
    aggregation, _ = read_optional(store, LAYOUT.aggregation_report(round_id), AggregationReport)
    report, _ = read_optional(store, LAYOUT.round_report(round_id), RoundReport)
    steps = [s for s in STEPS if s in tasks] + sorted(set(tasks) - set(STEPS))
    phases: dict[str, float] = {"dag_test_startup_s": tasks["publish"]["start"] - run_started}
    previous_end = None
    for step in steps:
        t = tasks[step]
        if t["start"] is None or t["end"] is None:
            continue
        if previous_end is not None:
            phases[f"hop_before_{step}_s"] = t["start"] - previous_end
        phases[f"{step}_s"] = t["end"] - t["start"]
        previous_end = t["end"]
    last_commit = max(u.committed_at for u in closing.updates).timestamp() if closing and closing.updates else None
    promote_end = tasks.get("promote", {}).get("end")
    publish = tasks["publish"]
    out = {
        "round_id": round_id,
        "status": report.status if report else None,
        "updates": len(closing.updates) if closing else 0,
        "states": {k: v["state"] for k, v in tasks.items()},
        "phases_s": phases,
        "run_wall_s": run_ended - run_started,
    }
    if last_commit is not None and promote_end is not None:
        out["client_window_s"] = last_commit - publish["end"]
        out["wait_after_last_commit_s"] = tasks["wait_for_updates"]["end"] - last_commit
        out["overhead_s"] = (publish["end"] - publish["start"]) + (promote_end - last_commit)
    if aggregation is not None:
        out["aggregation_timings_s"] = aggregation.timings
    return out


class Federation:
    """A fresh federation (file store or fake-gcs-server) with its own Airflow home."""

    def __init__(self, root: Path, store_kind: str, *, clients: int, poll_seconds: float, gcs_endpoint: str | None):
        from fedbucket import open_store
        from fedbucket.server.config import FederationConfig
        from fedbucket.server.initialise import init_federation
        from fedbucket.torch.digits import digits
        from fedbucket_airflow.local import local_airflow_env, migrate

        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        if store_kind == "file":
            self.url = (root / "bucket").as_uri()
        else:
            self.url = f"gs://{BUCKET}/{root.name}"
        self.store = open_store(self.url, create=True)
        self.config_path = write_config(root / "federation.toml", self.url, clients=clients, poll_seconds=poll_seconds)
        init_federation(self.store, FederationConfig.load(self.config_path), validation=digits()[1])
        self.home = root / "airflow-home"
        self.env = local_airflow_env(self.config_path, self.home)
        if gcs_endpoint:
            self.env["STORAGE_EMULATOR_HOST"] = gcs_endpoint
        migrate(self.env)

    def run_round(self, round_id: str, clients: LightClients) -> dict:
        from fedbucket_airflow.local import run_round

        clients.start(round_id)
        started = time.time()
        code = run_round(self.env, round_id, self.root / "logs" / f"{round_id}.log")
        ended = time.time()
        clients.join()
        if code != 0 or clients.errors:
            raise RuntimeError(
                f"round {round_id} failed (exit {code}; log {self.root / 'logs' / (round_id + '.log')}); "
                f"client errors: {clients.errors[:5]}"
            )
        return round_profile(self.store, round_id, task_times(self.home), started, ended)


def _gcs() -> object:
    from fedbucket.sim.emulator import FakeGCSServer

    return FakeGCSServer(buckets=[BUCKET])


def many_clients(args: argparse.Namespace, work: Path, gcs_endpoint: str | None) -> list[dict]:
    rows = []
    for store_kind in args.stores:
        for n in args.clients:
            fed = Federation(
                work / f"{store_kind}-{n}",
                store_kind,
                clients=n,
                poll_seconds=args.poll_seconds,
                gcs_endpoint=gcs_endpoint if store_kind == "gcs" else None,
            )
            clients = LightClients(fed.url, n, fed.root / "client-cache")
            row = {"store": store_kind, "clients": n, **fed.run_round(f"many-{n}", clients)}
            print(
                f"  {store_kind} {n:5d} clients: overhead {row['overhead_s']:.1f} s, client window "
                f"{row['client_window_s']:.1f} s, status {row['status']}",
                flush=True,
            )
            rows.append(row)
    return rows


def many_rounds(args: argparse.Namespace, work: Path, gcs_endpoint: str | None) -> dict:
    store_kind = args.stores[0]
    fed = Federation(
        work / f"rounds-{store_kind}",
        store_kind,
        clients=args.round_clients,
        poll_seconds=args.poll_seconds,
        gcs_endpoint=gcs_endpoint if store_kind == "gcs" else None,
    )
    rows = []
    for number in range(1, args.rounds + 1):
        clients = LightClients(fed.url, args.round_clients, fed.root / "client-cache")
        row = fed.run_round(f"r{number:02d}", clients)
        print(f"  round {number:2d}: overhead {row['overhead_s']:.1f} s, status {row['status']}", flush=True)
        rows.append(row)
    overheads = [r["overhead_s"] for r in rows]
    return {
        "store": store_kind,
        "clients": args.round_clients,
        "rounds": rows,
        "median_overhead_s": statistics.median(overheads),
        "max_overhead_s": max(overheads),
    }


def run(args: argparse.Namespace) -> dict:
    """Run the scenarios in ``args.only`` (None: both), write the JSON and the plot, return the data."""
    work = Path(tempfile.mkdtemp(prefix="bench-rounds-"))
    out = Path(getattr(args, "out", None) or OUT)
    previous = json.loads(out.read_text()) if out.exists() else {}
    data = {"cpu_count": os.cpu_count(), "poll_seconds": args.poll_seconds, **previous}
    gcs = _gcs() if "gcs" in args.stores else None
    try:
        endpoint = None
        if gcs is not None:
            gcs.__enter__()
            endpoint = gcs.endpoint
            os.environ["STORAGE_EMULATOR_HOST"] = endpoint
        if args.only in (None, "clients"):
            data["many_clients"] = many_clients(args, work, endpoint)
        if args.only in (None, "rounds"):
            data["many_rounds"] = many_rounds(args, work, endpoint)
    finally:
        if gcs is not None:
            gcs.__exit__(None, None, None)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    data["cpu_count"] = os.cpu_count()
    if getattr(args, "baseline_from", None):  # the same harness run on the code before, for the side-by-side
        before = json.loads(Path(args.baseline_from).read_text())
        data["baseline"] = {k: before[k] for k in ("many_clients", "many_rounds", "commit") if k in before}
    if getattr(args, "commit", None):
        data["commit"] = args.commit
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    if out == OUT:
        plot(data)
    return data


#: Phases of the breakdown, grouped for the plot and the table.
GROUPS = {
    "publish": ("publish_s",),
    "wait: notice the last update, freeze": (),  # wait_after_last_commit_s
    "hops between steps": ("hop_before_aggregate_s", "hop_before_evaluate_s", "hop_before_promote_s"),
    "aggregate (spark-submit)": ("aggregate_s",),
    "evaluate (spark-submit)": ("evaluate_s",),
    "promote": ("promote_s",),
}


def breakdown(row: dict) -> dict[str, float]:
    """The overhead of one round split into GROUPS (they add up to ``overhead_s``, up to the
    wait's hop, which is counted with the wait)."""
    p = row["phases_s"]
    out = {name: sum(p.get(k, 0.0) for k in keys) for name, keys in GROUPS.items()}
    out["wait: notice the last update, freeze"] = row["wait_after_last_commit_s"]
    return out


def plot(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("many_clients", "many_rounds") if data.get(k)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        if key == "many_clients":
            for store in sorted({r["store"] for r in data[key]}):
                rows = [r for r in data[key] if r["store"] == store]
                line = ax.plot(
                    [r["clients"] for r in rows], [r["overhead_s"] for r in rows], "o-", label=f"{store} store"
                )
                before = [r for r in data.get("baseline", {}).get(key, []) if r["store"] == store]
                if before:
                    ax.plot(
                        [r["clients"] for r in before], [r["overhead_s"] for r in before], "x--",
                        color=line[0].get_color(), alpha=0.6, label=f"{store} store, before",
                    )  # fmt: skip
            ax.axhline(60, color="grey", ls="--", lw=1, label="target 60 s")
            ax.set_xscale("log")
            ax.set_xlabel("clients in the round")
            ax.set_ylabel("server overhead per round (s)")
            ax.set_title("One round, many clients")
        else:
            rows = data[key]["rounds"]
            x = np.arange(1, len(rows) + 1)
            bottom = np.zeros(len(rows))
            for name in GROUPS:
                values = np.array([breakdown(r)[name] for r in rows])
                ax.bar(x, values, bottom=bottom, label=name)
                bottom += values
            before = data.get("baseline", {}).get(key)
            if before:
                ax.axhline(before["median_overhead_s"], color="black", ls=":", lw=1, label="before: median")
            ax.axhline(15, color="grey", ls="--", lw=1, label="target 15 s")
            ax.set_xticks(x[::2] if len(rows) > 10 else x)
            ax.set_xlabel("round")
            ax.set_ylabel("server overhead (s)")
            ax.set_title(f"{len(rows)} rounds, {data[key]['clients']} clients, small model")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def render(data: dict) -> str:
    lines = [
        "## Round overhead through the DAG",
        "",
        "Real `dag.test()` runs of the round DAG (one process per round, as `make rounds` runs them), real "
        "spark-submit on `local[2]`, the digits MLP (hidden 32). Lightweight clients: SDK threads that fetch the "
        "model and `submit` it plus noise, all waiting when the round opens. **Server overhead** = the publish "
        "step + the time from the commit of the round's last update to the end of the promote step (the client "
        f"window is left out; the wait ends when every client is in, polling every {data.get('poll_seconds', '?')} "
        "s). `python -m tests.benchmarks.run --only rounds`.",
        "",
    ]
    if data.get("many_clients"):
        before = {(r["store"], r["clients"]): r for r in data.get("baseline", {}).get("many_clients", [])}
        lines += [
            "| store | clients | server overhead s | before s | publish s | wait after the last update s | Spark "
            "step(s) s | client window s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in data["many_clients"]:
            p, b = r["phases_s"], before.get((r["store"], r["clients"]))
            cells = [
                r["store"],
                f"{r['clients']:,}",
                f"**{r['overhead_s']:.1f}**",
                f"{b['overhead_s']:.1f}" if b else "—",
                f"{p['publish_s']:.1f}",
                f"{r['wait_after_last_commit_s']:.1f}",
                f"{p.get('aggregate_s', 0) + p.get('evaluate_s', 0):.1f}",
                f"{r['client_window_s']:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if data.get("many_rounds"):
        m = data["many_rounds"]
        rows = m["rounds"]
        parts = {name: statistics.median(breakdown(r)[name] for r in rows) for name in GROUPS}
        lines += [
            f"{len(rows)} consecutive rounds of {m['clients']} clients on the {m['store']} store: median server "
            f"overhead **{m['median_overhead_s']:.1f} s** per round (max {m['max_overhead_s']:.1f} s). Median per "
            "phase (s): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()) + ". Each run also spends "
            f"{statistics.median(r['phases_s']['dag_test_startup_s'] for r in rows):.1f} s starting `dag.test()` "
            "(process, DAG parse) before publish: a scheduler pays that once, not per round.",
            "",
        ]
        for step in data.get("steps", []):  # intermediate states of the code, measured in the same session
            lines += [
                f"- {step['label']}: median **{step['median_overhead_s']:.1f} s** over {step['rounds']} rounds.",
                "",
            ]
        b = data.get("baseline", {}).get("many_rounds")
        if b:
            parts = {name: statistics.median(breakdown(r)[name] for r in b["rounds"]) for name in GROUPS}
            lines += [
                f"Before (commit {data['baseline'].get('commit', '?')}: aggregate and evaluate as two spark-submits, "
                f"a new Execution API app per task), {len(b['rounds'])} rounds measured in the same session: median "
                f"**{b['median_overhead_s']:.1f} s**; per phase (s): "
                + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
                + ".",
                "",
            ]
    if PLOT.exists():
        lines += ["![server overhead](benchmarks/rounds.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["clients", "rounds"], default=None)
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[10, 100, 1000])
    parser.add_argument("--stores", type=lambda s: s.split(","), default=["file", "gcs"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--round-clients", type=int, default=10)
    parser.add_argument("--poll-seconds", type=float, default=1.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, buckets)")
    parser.add_argument("--out", default=str(OUT), help="JSON to write (the plot only for the default)")
    parser.add_argument("--baseline-from", default=None, help="a JSON this harness wrote for the code before")
    parser.add_argument("--commit", default=None, help="the commit measured, recorded in the JSON")
    print(render(run(parser.parse_args())))


if __name__ == "__main__":
    main()
