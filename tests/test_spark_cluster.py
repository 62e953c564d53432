"""The aggregation job on a real Spark standalone cluster (a master and two 1-core workers started
from the pyspark wheel on 127.0.0.1): the same candidate bytes as ``local[2]`` and as the in-process
engine, with the work spread over both executors in their own JVMs and Python workers."""

from __future__ import annotations

import pytest
from benchmarks.bench_cluster import StandaloneCluster, aggregate_once
from test_aggregation import client_deltas, setup_round

from fedbucket import LAYOUT, open_store
from fedbucket.server.aggregation import run_aggregation
from fedbucket.server.strategies import build_strategy

pytestmark = pytest.mark.spark


def test_job_on_a_standalone_cluster_writes_the_local_bytes(tmp_path):
    store = open_store((tmp_path / "bucket").as_uri(), create=True)
    deltas, examples = client_deltas(6)
    setup_round(store, tmp_path, deltas, examples)
    run_aggregation(store, "r1", build_strategy("fedavgm"), shard_elements=9)
    serial = store.get_bytes(LAYOUT.candidate_payload("r1"))[0]
    serial_manifest = store.get_bytes(LAYOUT.candidate_manifest("r1"))[0]
    options = ("--strategy", "fedavgm", "--shard-elements", "9")  # a few shards per task, tasks on both executors

    with StandaloneCluster(tmp_path / "cluster", workers=2, cores=1, memory="1g") as cluster:
        on_cluster = aggregate_once(cluster.url, store.url, "r1", tmp_path / "cluster.log", cluster, options)
        cluster_bytes = store.get_bytes(LAYOUT.candidate_payload("r1"))[0]
        cluster_manifest = store.get_bytes(LAYOUT.candidate_manifest("r1"))[0]
        assert cluster_bytes == serial and cluster_manifest == serial_manifest

    local = aggregate_once("local[2]", store.url, "r1", tmp_path / "local.log", None, options)
    assert store.get_bytes(LAYOUT.candidate_payload("r1"))[0] == serial
    assert local["candidate_sha256"] == on_cluster["candidate_sha256"] == on_cluster["report_candidate_sha256"]
    assert on_cluster["engine"]["master"] == cluster.url and local["engine"]["master"] == "local[2]"
    # Both executors of the cluster registered before the job started and both ran tasks.
    assert len(on_cluster["executors"]) == 2, on_cluster["executors"]
    assert all(tasks > 0 for tasks in on_cluster["executors"].values()), on_cluster["executors"]
    assert not cluster.processes  # stopped on leaving the block
