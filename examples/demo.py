"""A real local federation, end to end: ``make demo``.

1. initialises a federation in ``demo-output/bucket`` (file://): an MLP for 8x8 digits, the
   held-out split;
2. starts ``fedbucket simulate``: 10 client processes on a Dirichlet(0.5) non-IID split of
   digits that train with PyTorch each round — one drops out, one straggles past the deadline,
   one sends a different hostile update every round;
3. runs R rounds of the real Airflow DAG (``dag.test()``): publish, wait (quorum or deadline),
   aggregate with Spark, evaluate with Spark, promote through the gate, report;
4. prints a table per round and writes ``demo-output/report.md`` with a plot of the metrics.

Every process it starts is stopped on exit. Logs: ``demo-output/logs/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))
from fedbucket_airflow.local import local_airflow_env, migrate, run_round  # noqa: E402 - after the path


def write_config(path: Path, bucket: str, args: argparse.Namespace) -> None:
    clean = args.clean_clients
    path.write_text(
        "\n".join(
            [
                f'bucket = "{bucket}"',
                'model = { name = "mlp", kwargs = { hidden = 64 } }',
                "seed = 0",
                "retries = 1",
                "retry_delay_seconds = 2",
                "",
                "[round]",
                f"deadline_seconds = {args.deadline}",
                f"min_clients = {args.clients}",  # all of them: with misbehaving clients, rounds close at the deadline
                f"max_clients = {args.clients}",
                f"min_clients_at_deadline = {max(2, args.clients // 2)}",
                "settle_seconds = 2",
                "poll_seconds = 1",
                "max_update_norm = 100.0",
                "",
                "[training]",
                f"local_epochs = {args.local_epochs}",
                "batch_size = 16",
                "learning_rate = 0.05",
                "",
                "[aggregation]",
                f'strategy = "{args.strategy}"',
                'spark_master = "local[2]"',
                "",
                "[gate]",
                'metric = "accuracy"',
                f"tolerance = {0.05 if not clean else 0.1}",
                "",
                *(
                    [
                        "[secure_aggregation]",  # the server sees only the sum (docs/privacy.md)
                        "enabled = true",
                        "clip_norm = 10.0",
                        "phase_seconds = 60",
                        "grace_seconds = 2",
                        "",
                    ]
                    if args.secure_aggregation
                    else []
                ),
            ]
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds to run")
    parser.add_argument("--clients", type=int, default=10, help="simulated clients")
    parser.add_argument("--deadline", type=float, default=25.0, help="seconds clients have per round")
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--clean-clients", action="store_true", help="no dropout, straggler or hostile client")
    parser.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="run every round with secure aggregation: clients mask their updates, the server learns only the sum",
    )
    parser.add_argument("--out", default=str(REPO / "demo-output"), help="output folder (recreated)")
    args = parser.parse_args()

    out = Path(args.out).resolve()
    shutil.rmtree(out / "bucket", ignore_errors=True)
    shutil.rmtree(out / "airflow-home", ignore_errors=True)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bucket = (out / "bucket").as_uri()
    config_path = out / "federation.toml"
    write_config(config_path, bucket, args)
    bin_dir = Path(sys.executable).parent
    env = {**local_airflow_env(config_path, out / "airflow-home"), "FEDBUCKET_CACHE": str(out / "client-cache")}
    started = time.monotonic()
    secure = " with secure aggregation" if args.secure_aggregation else ""
    print(f"fedbucket demo: {args.rounds} round(s), {args.clients} clients{secure}, federation at {bucket}")
    subprocess.run([str(bin_dir / "fedbucket"), "init", "--config", str(config_path)], check=True, env=env)

    simulate = [
        str(bin_dir / "fedbucket"), "simulate", "--bucket", bucket, "--clients", str(args.clients),
        "--rounds", str(args.rounds), "--partition", "dirichlet", "--alpha", "0.5", "--seed", "0",
        "--poll-interval", "0.5", "--round-timeout", "900",
    ]  # fmt: skip
    if not args.clean_clients:
        simulate += ["--dropout", str(1 / args.clients), "--stragglers", "1", "--hostile", "1"]
    client_log = open(logs / "clients.log", "w")  # noqa: SIM115 - closed in finally
    clients = subprocess.Popen(simulate, stdout=client_log, stderr=subprocess.STDOUT, env=env)
    print(f"started {args.clients} simulated clients (pid {clients.pid}); their log: {logs / 'clients.log'}")
    rows: list[dict] = []
    try:
        migrate(env)
        columns = ("round", "status", "accepted", "rejected", "late", "accuracy", "macro-F1")
        header = "{:9s} {:9s} {:>8s} {:30s} {:>4s} {:>8s} {:>8s}  promoted".format(*columns)
        print(header)
        print("-" * len(header))
        for number in range(1, args.rounds + 1):
            round_id = f"demo-{number:02d}"
            returncode = run_round(env, round_id, logs / f"airflow-{round_id}.log")
            row = round_row(out / "bucket", round_id, returncode)
            rows.append(row)
            promoted = "yes" if row["promoted"] else "no"
            print(
                f"{round_id:9s} {row['status']:9s} {row['accepted']:8d} {row['rejected_text'][:30]:30s} "
                f"{row['late']:4d} {fmt(row['accuracy']):>8s} {fmt(row['macro_f1']):>8s}  {promoted}"
            )
    finally:
        if clients.poll() is None:
            clients.terminate()
            try:
                clients.wait(timeout=20)
            except subprocess.TimeoutExpired:
                clients.kill()
        client_log.close()
    report = write_report(out, rows, args, time.monotonic() - started)
    federation_report = out / "federation-report.html"  # the Federation page's content, one file
    subprocess.run(
        [str(bin_dir / "fedbucket"), "report", "--bucket", bucket, "--html", str(federation_report)],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    print(f"\nreport: {report}\nplot:   {out / 'metrics.png'}\nclient lines: {logs / 'clients.log'}")
    print(f"federation report (HTML, plots inline): {federation_report}")
    print(f"the same in the Airflow UI (Federation page): make airflow FEDBUCKET_CONFIG={config_path}")
    print(f"demo finished in {time.monotonic() - started:.0f}s; all processes it started are stopped")
    return 0 if rows and all(r["status"] != "failed" for r in rows) else 1


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def round_row(bucket_dir: Path, round_id: str, returncode: int) -> dict:
    path = bucket_dir / "rounds" / round_id / "report.json"
    if not path.exists():
        return {"round": round_id, "status": "failed", "accepted": 0, "rejected_text": f"exit {returncode}",
                "rejected": {}, "late": 0, "accuracy": None, "macro_f1": None, "promoted": False,
                "current_accuracy": None}  # fmt: skip
    report = json.loads(path.read_text())
    updates = report["updates"]
    rejected = {u["client_id"]: u["code"] for u in updates if not u["accepted"] and u["code"] != "late"}
    metrics = report.get("metrics") or {}
    metrics = metrics.get("validation") or metrics.get("federated") or {}  # the gate's figures
    return {
        "round": round_id,
        "status": report["status"],
        "accepted": sum(u["accepted"] for u in updates),
        "rejected": rejected,
        "rejected_text": ", ".join(f"{c}:{code}" for c, code in rejected.items()) or "-",
        "late": sum(u["code"] == "late" for u in updates),
        "accuracy": metrics.get("candidate", {}).get("accuracy"),
        "macro_f1": metrics.get("candidate", {}).get("macro_f1"),
        "current_accuracy": metrics.get("current", {}).get("accuracy"),
        "promoted": report["status"] == "promoted",
    }


def write_report(out: Path, rows: list[dict], args: argparse.Namespace, seconds: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    xs = [i + 1 for i, r in enumerate(rows) if r["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(xs, [r["accuracy"] for r in rows if r["accuracy"] is not None], "-o", label="candidate accuracy")
    ax.plot(xs, [r["macro_f1"] for r in rows if r["macro_f1"] is not None], "-s", label="candidate macro-F1")
    ax.plot(xs, [r["current_accuracy"] for r in rows if r["accuracy"] is not None], "--", label="base model accuracy")
    for i, r in enumerate(rows):
        if r["promoted"]:
            ax.axvline(i + 1, color="green", alpha=0.08)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("held-out score")
    ax.set_ylim(0, 1)
    secure = ", secure aggregation" if args.secure_aggregation else ""
    ax.set_title(f"fedbucket: {args.clients} clients, Dirichlet(0.5) digits, {args.strategy}{secure}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=110)
    plt.close(fig)
    lines = [
        "# fedbucket demo report",
        "",
        f"{len(rows)} round(s) of the `fedbucket_round` DAG, {args.clients} simulated clients "
        f"({'all honest' if args.clean_clients else 'one dropout, one straggler, one hostile'}), strategy "
        f"`{args.strategy}`{', secure aggregation (the server saw only sums)' if args.secure_aggregation else ''}, "
        f"in {seconds:.0f} s. Bucket: `{out / 'bucket'}`.",
        "",
        "| round | status | accepted | rejected (code) | late | accuracy | macro-F1 | promoted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['status']} | {r['accepted']} | {r['rejected_text']} | {r['late']} | "
            f"{fmt(r['accuracy'])} | {fmt(r['macro_f1'])} | {'yes' if r['promoted'] else 'no'} |"
        )
    lines += ["", "![metrics per round](metrics.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "rounds.json").write_text(json.dumps(rows, indent=2) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
