"""Cluster readiness: the aggregation job on a Spark standalone cluster against ``local[*]``.

Starts a standalone master and two workers (1 core each) on 127.0.0.1 from the pyspark wheel's own
classes (``spark-class org.apache.spark.deploy.master.Master`` / ``...deploy.worker.Worker``: the
wheel has no ``start-master.sh``), generates a federation of N DistilBERT-sized updates with the
aggregation benchmark's generator, and runs ``spark-submit spark_jobs/aggregate.py`` on the same
round with ``--master spark://127.0.0.1:P`` and with ``--master local[*]``, alternating,
``--repeats`` times each. Before every run the round's candidate, aggregation report and server
state are deleted, so each run writes its own. It measures

- seconds end to end (spark-submit start to exit) and the job's own timings from its aggregation
  report (validate, aggregate, write), medians per master;
- the executors the cluster run used and the Spark tasks each ran (from the workers' executor logs);
- whether every run's candidate bytes (sha256) and candidate manifest are identical: the proof
  that the job computes the same model when its tasks run in executors on separate JVMs.

Writes ``docs/benchmarks/cluster.json``; ``make bench`` renders it. The cluster's processes run in
their own process groups and are always stopped, also on failure. :class:`StandaloneCluster` is
used by ``tests/test_spark_cluster.py`` too.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from fedbucket import LAYOUT, open_store
from fedbucket.protocol.documents import AggregationReport, read_document

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "benchmarks" / "cluster.json"
#: Only a safety net for a hung process: every wait ends on its event (a JSON field, a process exit).
STARTUP_TIMEOUT_S = 600.0


def spark_home() -> Path:
    """The pyspark wheel's directory: its ``bin/`` has spark-class and spark-submit."""
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spark_env(python: str = sys.executable) -> dict[str, str]:
    """What the Makefile exports for Spark: the venv's python for workers, the loopback address.

    No PYTHONPATH: executors must find fedbucket where a cluster node has it (installed in the
    python they run), never in this checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYSPARK_PYTHON": python, "PYSPARK_DRIVER_PYTHON": python, "SPARK_LOCAL_IP": "127.0.0.1"}


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _stop_group(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the process group ``process`` leads (the JVM, its executors and their Python
    workers), wait for the leader, then SIGKILL whatever of the group is left."""
    import psutil

    pgid = process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        process.wait(grace_s)
    # Executors or Python workers that outlived the leader: still in its group (pid == pgid is not reused
    # while the group has members).
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid:
                os.killpg(pgid, signal.SIGKILL)
                break


class StandaloneCluster:
    """A Spark standalone master and ``workers`` workers on 127.0.0.1, started from the pyspark
    wheel, as a context manager. Everything (work dirs, local dirs, logs) lives under ``root``.

    Entering waits until the master's JSON status (``http://127.0.0.1:<webui>/json/``) reports every
    worker ALIVE; leaving stops the workers, then the master (process groups), whatever happened.
    """

    def __init__(
        self,
        root: Path,
        *,
        workers: int = 2,
        cores: int = 1,
        memory: str = "2g",
        python: str = sys.executable,
        timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self.root = Path(root)
        self.workers, self.cores, self.memory = workers, cores, memory
        self.python, self.timeout_s = python, timeout_s
        self.port, self.webui_port = free_port(), free_port()
        self.processes: list[tuple[str, subprocess.Popen, Path]] = []
        self.start_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"spark://127.0.0.1:{self.port}"

    def work_dir(self, worker: int) -> Path:
        return self.root / f"worker-{worker}" / "work"

    def status(self) -> dict[str, Any] | None:
        """The master's JSON status, or None while it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.webui_port}/json/", timeout=10) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return None

    def _spawn(self, name: str, *arguments: str, env: dict[str, str]) -> None:
        log = self.root / f"{name}.log"
        command = [str(spark_home() / "bin" / "spark-class"), *arguments]
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=self.root, start_new_session=True,
            )  # fmt: skip
        self.processes.append((name, process, log))

    def wait_until(self, what: str, condition: Callable[[], Any]) -> Any:
        """Poll ``condition`` until it returns something truthy; fail at once if a cluster process exits."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            for name, process, log in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited ({process.returncode}) while waiting for {what}:\n{_tail(log)}")
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {name}\n{_tail(log, 1500)}" for name, _, log in self.processes)
                raise TimeoutError(f"no {what} after {self.timeout_s:.0f} s:\n{logs}")
            time.sleep(0.25)

    def __enter__(self) -> StandaloneCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            env = spark_env(self.python)
            self._spawn(
                "master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                "--port", str(self.port), "--webui-port", str(self.webui_port), env=env,
            )  # fmt: skip
            self.wait_until("master status", lambda: (s := self.status()) is not None and s.get("status") == "ALIVE")
            for i in range(self.workers):
                local = self.root / f"worker-{i}" / "local"  # executors' scratch (blocks, shuffle)
                local.mkdir(parents=True, exist_ok=True)
                self.work_dir(i).mkdir(parents=True, exist_ok=True)
                self._spawn(
                    f"worker-{i}", "org.apache.spark.deploy.worker.Worker", self.url, "--host", "127.0.0.1",
                    "--cores", str(self.cores), "--memory", self.memory, "--work-dir", str(self.work_dir(i)),
                    "--webui-port", "0", env={**env, "SPARK_LOCAL_DIRS": str(local)},
                )  # fmt: skip
            self.wait_until(f"{self.workers} ALIVE workers", self._all_workers_alive)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.perf_counter() - t0
        return self

    def _all_workers_alive(self) -> bool:
        status = self.status() or {}
        alive = [w for w in status.get("workers", []) if w.get("state") == "ALIVE"]
        return len(alive) >= self.workers

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        for _, process, _ in reversed(self.processes):  # workers (and their executors) first, the master last
            _stop_group(process)
        self.processes.clear()

    def app_dirs(self) -> set[Path]:
        return {p for i in range(self.workers) if self.work_dir(i).exists() for p in self.work_dir(i).iterdir()}

    @staticmethod
    def executors(app_dirs: set[Path]) -> dict[str, int]:
        """Executors of the given application dirs -> Spark tasks each ran (from its log)."""
        tasks = {}
        for app in sorted(app_dirs):
            for executor in sorted(p for p in app.iterdir() if p.is_dir()):
                log = _tail(executor / "stderr", 10**9)
                tasks[f"{app.parent.parent.name}/executor-{executor.name}"] = len(re.findall(r"Running task ", log))
        return tasks


# -- one run of the job --------------------------------------------------------------------------


def clear_outputs(store_url: str, round_id: str) -> None:
    """Delete what the job writes for a round: candidate (payload, manifest, anything else under
    candidate/), aggregation report, server state, so that the next run starts clean."""
    store = open_store(store_url)
    names = [o.name for o in store.list(LAYOUT.round_prefix(round_id) + "candidate/")]
    names += [o.name for o in store.list(f"state/{round_id}/")]
    names.append(LAYOUT.aggregation_report(round_id))
    for name in names:
        if store.exists(name):
            store.delete(name)


def submit(
    master: str,
    store_url: str,
    round_id: str,
    log: Path,
    *extra: str,
    cluster_cores: int | None = None,
    timeout_s: float = 1800,
) -> subprocess.CompletedProcess:
    """``spark-submit --master <master> spark_jobs/aggregate.py`` in its own process group, output to ``log``.

    With ``cluster_cores`` (a standalone master) the job asks for that many cores and waits (an
    event, not a time) until executors with all of them have registered before it schedules
    anything: without ``spark.cores.max`` standalone counts 0 expected cores, so the first stage
    would run on whichever executor came up first."""
    waiting = []
    if cluster_cores is not None:
        waiting = [
            "--conf", f"spark.cores.max={cluster_cores}",
            "--conf", "spark.scheduler.minRegisteredResourcesRatio=1.0",
            "--conf", f"spark.scheduler.maxRegisteredResourcesWaitingTime={int(timeout_s)}s",
        ]  # fmt: skip
    command = [
        str(spark_home() / "bin" / "spark-submit"), "--master", master, "--driver-memory", "2g",
        "--conf", "spark.ui.enabled=false", *waiting,
        str(REPO / "spark_jobs" / "aggregate.py"), "--bucket", store_url, "--round", round_id, *extra,
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=spark_env(),
            start_new_session=True,
        )  # fmt: skip
        try:
            returncode = process.wait(timeout_s)
        except BaseException:
            _stop_group(process, grace_s=10)
            raise
        finally:
            with contextlib.suppress(ProcessLookupError):  # python workers of a local[*] run, if any survived
                os.killpg(process.pid, signal.SIGKILL)
    output = _tail(log, 20000)
    return subprocess.CompletedProcess(command, returncode, output, "")


def executors_ready_seconds(log: Path) -> float | None:
    """Seconds (whole, from the driver log's timestamps) from the SparkContext's start to the
    scheduler's "ready": the wait for the cluster's executors to launch and register."""
    stamps = {}
    for line in _tail(log, 10**9).splitlines():
        found = re.match(r"(\d\d/\d\d/\d\d \d\d:\d\d:\d\d) INFO .*(Running Spark version|ready for scheduling)", line)
        if found and found.group(2) not in stamps:
            stamps[found.group(2)] = datetime.strptime(found.group(1), "%y/%m/%d %H:%M:%S")
    if len(stamps) < 2:
        return None
    return (stamps["ready for scheduling"] - stamps["Running Spark version"]).total_seconds()


def aggregate_once(
    master: str,
    store_url: str,
    round_id: str,
    log: Path,
    cluster: StandaloneCluster | None = None,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Clear the round's outputs, run the job on ``master`` and describe what it wrote."""
    clear_outputs(store_url, round_id)
    before = cluster.app_dirs() if cluster else set()
    t0 = time.perf_counter()
    cores = cluster.workers * cluster.cores if cluster else None
    done = submit(master, store_url, round_id, log, *extra, cluster_cores=cores)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"aggregate.py on {master} exited {done.returncode}:\n{done.stdout[-4000:]}")
    store = open_store(store_url)
    report, _ = read_document(store, LAYOUT.aggregation_report(round_id), AggregationReport)
    payload = LAYOUT.candidate_payload(round_id)
    digest = hashlib.sha256()
    with store.open_reader(payload) as f:
        while chunk := f.read(16 * 1024 * 1024):
            digest.update(chunk)
    manifest, _ = store.get_bytes(LAYOUT.candidate_manifest(round_id))
    return {
        "master": master,
        "seconds": seconds,
        "timings": report.timings,
        "engine": report.engine,
        "candidate_sha256": digest.hexdigest(),
        "report_candidate_sha256": report.candidate_sha256,
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "executors": StandaloneCluster.executors(cluster.app_dirs() - before) if cluster else {},
        "executors_ready_s": executors_ready_seconds(log) if cluster else None,
    }


# -- the benchmark -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    from tests.benchmarks.bench_aggregate import MODEL_BYTES, ROUND, generate, select_clients
    from tests.benchmarks.distilbert import NUM_PARAMETERS

    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cluster-", dir=data_dir) as tmp:
        # A federation of its own: the aggregation benchmark's data dir may hold another N.
        root = Path(tmp) / "federation"
        print(f"cluster: generating {args.n} DistilBERT-sized updates ({args.n * MODEL_BYTES / 1e9:.1f} GB)")
        generate(root, args.n)
        select_clients(root, args.n)
        logs = Path(tmp) / "logs"
        logs.mkdir()
        with StandaloneCluster(Path(tmp) / "cluster", workers=2, cores=1, memory="2g") as cluster:
            print(f"cluster: master {cluster.url} and 2 workers up in {cluster.start_seconds:.1f} s")
            for repeat in range(args.repeats):
                for name, master in (("cluster", cluster.url), ("local", "local[*]")):  # alternating
                    log = logs / f"{name}-{repeat}.log"
                    result = aggregate_once(master, root.as_uri(), ROUND, log, cluster if name == "cluster" else None)
                    result |= {"name": name, "repeat": repeat}
                    runs.append(result)
                    print(
                        f"  {name} run {repeat + 1}: {result['seconds']:.1f}s end to end, "
                        f"{result['timings']['total_s']:.1f}s in the job, candidate {result['candidate_sha256'][:12]}"
                        + (f", executors {result['executors']}" if name == "cluster" else "")
                    )
            start_seconds = cluster.start_seconds
        shutil.rmtree(root, ignore_errors=True)
    first = runs[0]
    summary = {}
    for name in ("cluster", "local"):
        mine = [r for r in runs if r["name"] == name]
        summary[name] = {
            "master": mine[0]["master"],
            "seconds": [r["seconds"] for r in mine],
            "median_s": statistics.median(r["seconds"] for r in mine),
            # the job's own phases, whatever it names them (its report's timings; total_s last)
            "phases_median_s": {
                k: statistics.median(r["timings"][k] for r in mine)
                for k in sorted(mine[0]["timings"], key=lambda k: k == "total_s")
                if all(k in r["timings"] for r in mine)
            },
            "outside_job_median_s": statistics.median(r["seconds"] - r["timings"]["total_s"] for r in mine)
            if all("total_s" in r["timings"] for r in mine)
            else None,
            "shards": mine[0]["engine"].get("shards"),
            "executors": mine[-1]["executors"],
        }
        if name == "cluster":
            ready = [r["executors_ready_s"] for r in mine if r["executors_ready_s"] is not None]
            summary[name]["executors_ready_median_s"] = statistics.median(ready) if ready else None
    data = {
        "n": args.n,
        "model_parameters": NUM_PARAMETERS,
        "update_bytes": args.n * MODEL_BYTES,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "spark_version": first["engine"].get("spark_version"),
        "cluster": {"workers": 2, "cores_per_worker": 1, "worker_memory": "2g", "start_s": start_seconds},
        "results": summary,
        "candidate_sha256": first["candidate_sha256"],
        "bytes_equal": all(r["candidate_sha256"] == first["candidate_sha256"] for r in runs),
        "manifests_equal": all(r["manifest_sha256"] == first["manifest_sha256"] for r in runs),
        "runs": runs,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=2) + "\n")
    if not data["bytes_equal"]:
        raise RuntimeError(f"candidate bytes differ between the cluster and local[*]: see {OUT}")
    return data


def render(data: dict) -> str:
    c, local = data["results"]["cluster"], data["results"]["local"]
    tasks = ", ".join(f"{n}: {t}" for n, t in c["executors"].items())
    phases = [k for k in c["phases_median_s"] if k in local["phases_median_s"]]
    lines = [
        "## Aggregation on a Spark standalone cluster",
        "",
        f"N = {data['n']} DistilBERT-sized updates ({data['model_parameters']:,} float32 parameters each), FedAvg, "
        f"the same round aggregated by `spark-submit spark_jobs/aggregate.py` on a standalone cluster (a master "
        f"and {data['cluster']['workers']} workers of {data['cluster']['cores_per_worker']} core, "
        f"{data['cluster']['worker_memory']} each, started from the pyspark wheel's classes on 127.0.0.1) and on "
        f"`local[*]`, alternating, medians of {data['repeats']} run(s) each, {data['cpu_count']} cores, Spark "
        f"{data['spark_version']} (`python -m tests.benchmarks.run --only cluster`). The candidate and the "
        "aggregation report are deleted before every run. Phase columns are the job's own timings from its "
        'aggregation report; "outside the job" is the median of end to end minus the job\'s total (JVM and '
        "session start, on the cluster also launching the executors).",
        "",
        "| master | end to end s | outside the job s | "
        + " | ".join(f"{k.removesuffix('_s')} s" for k in phases)
        + " | shards |",
        "|---|---|---|" + "---|" * len(phases) + "---|",
    ]
    for label, r in ((f"standalone cluster ({len(c['executors'])} executors)", c), ("`local[*]`", local)):
        p = r["phases_median_s"]
        outside_s = r.get("outside_job_median_s")
        outside = f"{outside_s:.1f}" if outside_s is not None else "—"
        cells = " | ".join(f"{p[k]:.1f}" for k in phases)
        lines.append(f"| {label} | {r['median_s']:.1f} | {outside} | {cells} | {r['shards']} |")
    equal = data["bytes_equal"] and data["manifests_equal"]
    ready = c.get("executors_ready_median_s")
    lines += [
        "",
        f"Candidate bytes **{'identical' if data['bytes_equal'] else 'DIFFERENT'}** in every run "
        f"(sha256 `{data['candidate_sha256'][:16]}…`), candidate manifests "
        f"{'identical' if data['manifests_equal'] else 'different'}"
        + (": the job is cluster-ready." if equal else ".")
        + f" Executors of the last cluster run and the Spark tasks each ran: {tasks}."
        + (
            f" On the cluster the driver waited {ready:.0f} s (median, driver log) for both executors to launch "
            "and register before scheduling anything."
            if ready is not None
            else ""
        )
        + f" Cluster start (master up, both workers registered): {data['cluster']['start_s']:.1f} s, not counted "
        "above.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8, help="updates aggregated")
    parser.add_argument("--repeats", type=int, default=2, help="runs per master")
    parser.add_argument("--data-dir", default=str(REPO / "bench-data"))
    print(render(run(parser.parse_args())))


if __name__ == "__main__":
    main()
