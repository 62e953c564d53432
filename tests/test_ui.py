"""The Federation page and ``fedbucket report``, as a person would use them.

A real federation is built with the server library and real PyTorch clients (three rounds of
digits, one hostile client), then the real Airflow API server is started with the fedbucket plugin
and Debian's Chromium (driven by Playwright) logs in through Airflow's own login page and reads the
pages. Assertions are on what is rendered: round counts, a known accuracy, a rejection code.

Screenshots go to ``$FEDBUCKET_UI_SCREENSHOTS`` when it is set (``make ui-screenshots``: docs/ui/).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fedbucket import Client, open_store
from fedbucket.protocol.documents import write_document
from fedbucket.protocol.layout import LAYOUT

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
ROUNDS = ("ui-01", "ui-02", "ui-03")


def build_federation(root: Path) -> str:
    """Three real rounds through the server library: 4 honest clients training on digits, one
    sending NaNs every round; each candidate evaluated on the server's split and promoted if good."""
    from fedbucket.protocol.documents import utcnow
    from fedbucket.server.aggregation import run_aggregation
    from fedbucket.server.config import FederationConfig
    from fedbucket.server.evaluation import run_evaluation
    from fedbucket.server.initialise import init_federation
    from fedbucket.server.promotion import gate_decision, promote_candidate
    from fedbucket.server.report import build_round_report
    from fedbucket.server.rounds import freeze_round, open_round
    from fedbucket.server.strategies import build_strategy
    from fedbucket.sim.datasets import partition
    from fedbucket.sim.simulation import _hostile_payload, _write_raw_update
    from fedbucket.torch.task import example_split, load_task
    from fedbucket.torch.training import load_global_weights, train_local

    url = (root / "bucket").as_uri()
    store = open_store(url, create=True)
    config = FederationConfig(bucket=url, model={"name": "mlp", "kwargs": {"hidden": 32}})
    task = load_task(None)
    pool, validation, test = example_split(task, seed=0, holdout_fraction=0.2)
    init_federation(store, config, validation=validation, test=test)
    parts = partition(pool.y, 4, scheme="iid", seed=1)
    for number, round_id in enumerate(ROUNDS):
        round_task = open_round(store, round_id=round_id, opened_at=utcnow(), deadline_seconds=600,
                                training=config.training, min_clients=2, max_clients=10)  # fmt: skip
        for index, part in enumerate(parts):
            with Client(url, f"hospital-{index}", cache_dir=root / "cache") as client:
                model = task.build_model(round_task.model)
                load_global_weights(model, client.fetch_model(round_task))
                train_local(model, pool.subset(part), round_task.training, seed=number * 10 + index)
                client.submit(round_task, model.state_dict(), num_examples=len(part))
        rng = np.random.default_rng(number)
        _write_raw_update(store, round_task, "mallory", _hostile_payload("nan", round_task, rng), 5)
        freeze_round(store, round_task, reason="quorum", closed_at=utcnow())
        run_aggregation(store, round_id, build_strategy("fedavg", {}))
        evaluation = run_evaluation(store, round_id)
        if gate_decision(evaluation, config.gate).passed:
            promote_candidate(store, round_id)
        report = build_round_report(store, round_id, config.gate)
        report.airflow = {"dag_id": "fedbucket_round", "run_id": f"manual__{round_id}"}
        write_document(store, LAYOUT.round_report(round_id), report)
    return url


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("ui-federation")
    return build_federation(root), root


def test_report_command_writes_markdown_and_one_self_contained_html_file(built, tmp_path):
    from fedbucket.server.federation import FederationView

    url, _ = built
    rows = FederationView(open_store(url)).rounds()
    assert [r.round_id for r in rows] == list(ROUNDS)
    assert all(r.rejected == {"non_finite": 1} for r in rows)
    run = subprocess.run(
        [str(Path(sys.executable).parent / "fedbucket"), "report", "--bucket", url, "--last", "2"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "| ui-03 |" in run.stdout and "| ui-01 |" not in run.stdout and "non_finite x1" in run.stdout
    out = tmp_path / "report.html"
    fedbucket = str(Path(sys.executable).parent / "fedbucket")
    run = subprocess.run([fedbucket, "report", "--bucket", url, "--html", str(out)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert run.returncode == 0 and str(out) in run.stdout
    text = out.read_text()
    fetches = ("<script", "<link", 'src="http', "url(http", "@import")
    assert not [f for f in fetches if f in text]  # nothing is fetched from anywhere: plots are inline SVG
    assert text.count("<svg") >= 4 and f"{rows[-1].candidate['accuracy']:.3f}" in text
    run = subprocess.run([fedbucket, "report", "--bucket", url, "--round", "nope"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert run.returncode != 0 and len(run.stderr.strip().splitlines()) == 1 and "no report" in run.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def api_server(built, tmp_path_factory) -> str:
    """The real Airflow API server with the fedbucket plugin, for the federation built above."""
    url, _ = built
    home = tmp_path_factory.mktemp("ui-airflow")
    config = home / "federation.toml"
    config.write_text(f'bucket = "{url}"\nmodel = {{ name = "mlp", kwargs = {{ hidden = 32 }} }}\n')
    (home / "passwords.json").write_text(json.dumps({"admin": "fedbucket-ui-test"}))
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "FEDBUCKET_CONFIG": str(config),
        "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env=env)
    port = _free_port()
    log = open(home / "api-server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "airflow", "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # a bound on a busy machine, not an expectation
    while True:
        try:
            with urllib.request.urlopen(f"{base}/api/v2/monitor/health", timeout=5):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                log.close()
                pytest.fail(f"the API server did not come up:\n{(home / 'api-server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield base
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def test_the_plugin_pages_need_a_login(api_server):
    request = urllib.request.Request(f"{api_server}/fedbucket/", headers={"Accept": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 401


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: `make test` installs Debian's chromium "
                    "(apt-get install chromium) when it can; without it the browser test cannot run")  # fmt: skip
def test_the_federation_pages_in_a_real_browser(built, api_server):
    from playwright.sync_api import sync_playwright

    from fedbucket.server.federation import FederationView

    url, _ = built
    view = FederationView(open_store(url))
    rows = view.rounds()
    last = rows[-1]
    shots = os.environ.get("FEDBUCKET_UI_SCREENSHOTS")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1360, "height": 1000})
        page.goto(f"{api_server}/fedbucket/")  # not logged in: Airflow's login page, then back here
        page.wait_for_selector("input[type=password]", timeout=120_000)
        page.locator("input:not([type=password])").first.fill("admin")
        page.locator("input[type=password]").fill("fedbucket-ui-test")
        page.locator("button[type=submit]").click()
        page.wait_for_url(f"{api_server}/fedbucket/**", timeout=120_000)
        page.wait_for_selector("h1:has-text('Federation')")
        cards = page.locator(".card").all_inner_texts()
        assert any(c.startswith("rounds") and c.endswith("3") for c in cards), cards
        table = page.locator("table").first.inner_text()
        assert all(r in table for r in ROUNDS) and "non_finite x1" in table
        assert f"{last.candidate['accuracy']:.3f}" in table
        assert page.locator("svg").count() >= 2  # the plots are rendered, not only linked
        if shots:
            page.screenshot(path=f"{shots}/federation.png", full_page=True)

        page.click(f"table a:has-text('{last.round_id}')")
        page.wait_for_selector(f"h2:has-text('Round {last.round_id}')")
        body = page.locator("main").inner_text()
        assert "mallory" in body and "non_finite" in body and "hospital-0" in body
        assert "validation split" in body and page.locator("svg").count() >= 1  # the confusion matrix
        run_link = page.locator("a:has-text('the run')").get_attribute("href")
        assert run_link == f"/dags/fedbucket_round/runs/manual__{last.round_id}"  # to the Airflow run
        if shots:
            page.screenshot(path=f"{shots}/round.png", full_page=True)

        page.click("header >> text=Models")
        page.wait_for_selector("h1:has-text('Model registry')")
        registry = page.locator("main").inner_text()
        _, current = view.models()
        assert f"{current} (current)" in registry and "init" in registry
        page.select_option("select[name=a]", "init")
        page.select_option("select[name=b]", current)
        page.click("button[type=submit]")
        page.wait_for_selector(f"h2:has-text('init → {current}')")
        if shots:
            page.screenshot(path=f"{shots}/models.png", full_page=True)

        page.click("header >> text=Clients")
        page.wait_for_selector("h1:has-text('Clients')")
        clients = page.locator("main").inner_text()
        assert "5 clients" in clients and "mallory" in clients and "ui-01: non_finite" in clients
        if shots:
            page.screenshot(path=f"{shots}/clients.png", full_page=True)

        page.goto(f"{api_server}/plugin/federation")  # the entry in Airflow's own navigation
        frame = page.frame_locator("iframe")
        frame.locator("h1:has-text('Federation')").wait_for(timeout=120_000)
        page.get_by_text("Federation", exact=True).first.wait_for()  # its entry in Airflow's own menu
        if shots:
            page.screenshot(path=f"{shots}/airflow-nav.png")

        page.goto(f"{api_server}/fedbucket/dags/fedbucket_round/runs/manual__{last.round_id}")  # a DAG run's tab
        page.wait_for_selector(f"h2:has-text('Round {last.round_id}')")
        browser.close()


def test_a_client_confusion_matrix_must_agree_with_its_counts():
    """Clients' scores may carry a confusion matrix; a ragged or made-up one is an invalid evaluation
    (it would otherwise break the pooled figures or show a lie on the page)."""
    from fedbucket.protocol.documents import ModelScore
    from fedbucket.protocol.errors import InvalidEvaluation
    from fedbucket.protocol.validation import _check_confusion

    def score(confusion):
        return ModelScore(examples=4, loss_sum=1.0, true_positive=[2, 1], false_positive=[1, 0],
                          false_negative=[0, 1], confusion=confusion)  # fmt: skip

    _check_confusion("candidate", score([[2, 0], [1, 1]]), 2)
    for bad in ([[2], [1, 1]], [[2, 0], [0, 2]], [[2, 0, 0], [1, 1, 0], [0, 0, 0]]):
        with pytest.raises(InvalidEvaluation, match="confusion"):
            _check_confusion("candidate", score(bad), 2)
