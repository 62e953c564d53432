"""Run real rounds of the round DAG on this machine, without the Airflow UI: ``make rounds``.

    python -m fedbucket_airflow.local --config dags/federation.toml --rounds 3

Each round is one ``dag.test()`` run of ``fedbucket_round`` (publish, wait, aggregate with Spark,
[federated evaluation], evaluate, promote, report) in its own process, against the federation
the config names, with a private Airflow home (SQLite) under ``--home``. Clients are yours to
start (``fedbucket participate`` or ``fedbucket simulate``); the federation must be initialised
(``fedbucket init``). Prints one line per round from its report; exit 1 if a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_ROUND_SCRIPT = """
import functools, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.execution_time import supervisor
# dag.test() builds a new in-process Execution API app for every task, and the first request to
# each new app costs ~2 s of route building (Airflow 3.2): one app serves the whole run instead.
if hasattr(supervisor, "in_process_api_server"):
    supervisor.in_process_api_server = functools.cache(supervisor.in_process_api_server)
bag = DagBag(dag_folder=sys.argv[1])
if bag.import_errors:
    sys.exit(f"DAG import errors: {bag.import_errors}")
run = bag.get_dag("fedbucket_round").test(run_conf={"round_id": sys.argv[2]})
print("DAG RUN STATE", run.state)
sys.exit(0 if str(run.state) == "success" else 1)
"""


def local_airflow_env(config_path: Path, home: Path, *, dags: Path = REPO / "dags") -> dict[str, str]:
    """The environment a local ``dag.test()`` of the round DAG needs (the nine variables)."""
    return {
        **os.environ,
        "FEDBUCKET_CONFIG": str(config_path.resolve()),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")]),
        "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable),
        "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"),
    }


def migrate(env: dict[str, str]) -> None:
    """Create or upgrade the local metadata DB (idempotent, a few seconds on SQLite)."""
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, env=env, capture_output=True)


def run_round(env: dict[str, str], round_id: str, log_path: Path) -> int:
    """One ``dag.test()`` run of the round DAG as round ``round_id``; its output goes to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        return subprocess.run(
            [sys.executable, "-c", _ROUND_SCRIPT, env["AIRFLOW__CORE__DAGS_FOLDER"], round_id],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        ).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedbucket_airflow.local",
        description=__doc__.split("\n\n")[0],
        epilog="example: python -m fedbucket_airflow.local --config dags/federation.toml --rounds 3",
    )
    parser.add_argument("--config", required=True, type=Path, help="federation config (TOML)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds to run, one after the other (default 1)")
    parser.add_argument(
        "--round-prefix",
        default=None,
        help="round ids are <prefix>-01, -02, ... (default local-<UTC time now>: a new run never re-runs old rounds)",
    )
    parser.add_argument("--home", type=Path, default=Path("airflow-rounds"), help="Airflow home and logs")
    args = parser.parse_args(argv)
    if args.rounds < 1 or not args.config.is_file():
        parser.error("need --rounds >= 1 and an existing --config file")
    from fedbucket.protocol.documents import RoundReport, read_optional, utcnow
    from fedbucket.protocol.layout import LAYOUT
    from fedbucket.protocol.storage import open_store
    from fedbucket.server.config import FederationConfig

    config = FederationConfig.load(args.config)
    prefix = args.round_prefix or f"local-{utcnow():%Y%m%dT%H%M%S}"
    home = args.home.resolve()
    env = local_airflow_env(args.config, home)
    migrate(env)
    store = open_store(config.bucket)
    failed = 0
    for number in range(1, args.rounds + 1):
        round_id = f"{prefix}-{number:02d}"
        if store.exists(LAYOUT.round_task(round_id)):
            print(f"round {round_id} exists: this re-runs it (it keeps its task, updates and closing)", flush=True)
        print(f"round {round_id}: running the DAG (log: {home / 'logs' / (round_id + '.log')})", flush=True)
        code = run_round(env, round_id, home / "logs" / f"{round_id}.log")
        report, _ = read_optional(store, LAYOUT.round_report(round_id), RoundReport)
        failed += code != 0
        if report is None:
            print(f"round {round_id}: the DAG run {'failed' if code else 'ended'} without a report", flush=True)
        else:
            print(f"round {round_id}: {report.status} — {report.message}", flush=True)
            print(json.dumps(report.metrics, sort_keys=True)[:300], flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
