"""The Federation page inside the Airflow 3 UI: a FastAPI app the API server mounts at
``/fedbucket`` (this module is an Airflow plugin), linked from the navigation and from each DAG
run of the round DAG.

The pages are rendered on the server from the federation's bucket by
:mod:`fedbucket.server.report_html` (the same code as ``fedbucket report``), with plots as inline SVG:
no JavaScript, nothing fetched from elsewhere. Airflow does not protect a plugin's routes by itself:
every route here asks for the logged-in user (``GetUserDep``: the UI's ``_token`` cookie or a
bearer token), a browser without one is sent to Airflow's login page, and the DAG-run view also
checks read access to that DAG.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fedbucket.server.config import FederationConfig
from fedbucket.server.federation import FederationView
from fedbucket.server.report_html import clients_page, esc, models_page, overview_page, page, round_page
from fedbucket_airflow.hooks import FederationHook

URL_PREFIX = "/fedbucket"
BASE = URL_PREFIX + "/"
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "dags" / "federation.toml"

app = FastAPI(title="fedbucket: the federation", docs_url=None, redoc_url=None, openapi_url=None)


@functools.lru_cache(maxsize=4)
def _view(config_path: str) -> FederationView:
    """One view (and document cache) per federation config, for the life of the API server."""
    config = FederationConfig.load(config_path)
    return FederationView(FederationHook(config.bucket).store)


def federation() -> FederationView:
    return _view(os.environ.get("FEDBUCKET_CONFIG", str(DEFAULT_CONFIG)))


@app.exception_handler(HTTPException)
async def _not_logged_in(request: Request, exc: HTTPException) -> Response:
    """A browser without a valid session goes to Airflow's login page and comes back here."""
    browser = "text/html" in request.headers.get("accept", "")
    if browser and (exc.status_code == 401 or (exc.status_code == 403 and "JWT" in str(exc.detail))):
        back = request.url.path + (f"?{request.url.query}" if request.url.query else "")  # the mount prefix included
        return RedirectResponse(f"/api/v2/auth/login?next={quote(back)}", status_code=307)
    return HTMLResponse(page(f"{exc.status_code}", f"<h1>{exc.status_code}</h1><p>{esc(exc.detail)}</p>", base=BASE),
                        status_code=exc.status_code)  # fmt: skip


@app.get("/", response_class=HTMLResponse)
def rounds(user: GetUserDep, page: int = 1) -> str:
    return overview_page(federation(), base=BASE, page_number=page)


@app.get("/rounds/{round_id}", response_class=HTMLResponse)
def one_round(round_id: str, user: GetUserDep) -> str:
    text = round_page(federation(), round_id, base=BASE, airflow="")
    if text is None:
        raise HTTPException(404, f"round {round_id} has no report yet (it may still be running)")
    return text


@app.get("/models", response_class=HTMLResponse)
def models(user: GetUserDep, a: str | None = None, b: str | None = None) -> str:
    return models_page(federation(), base=BASE, a=a, b=b)


@app.get("/clients", response_class=HTMLResponse)
def clients(user: GetUserDep, page: int = 1) -> str:
    return clients_page(federation(), base=BASE, page_number=page)


@app.get("/dags/{dag_id}/runs/{run_id}", dependencies=[Depends(requires_access_dag("GET"))])
def dag_run(dag_id: str, run_id: str, user: GetUserDep) -> Response:
    """The round a DAG run made (the tab on a DAG run's page)."""
    view = federation()
    for row in reversed(view.rounds()):
        detail = view.round_detail(row.round_id)
        if detail is not None and detail.report.airflow.get("run_id") == run_id:
            return RedirectResponse(f"{BASE}rounds/{quote(row.round_id)}", status_code=307)
    body = f"<h1>{esc(dag_id)} / {esc(run_id)}</h1><p>This run has not written a round report yet.</p>"
    return HTMLResponse(page("fedbucket: run", body, base=BASE, bucket=view.store.url))


class FederationPlugin(AirflowPlugin):
    """Adds the Federation page to the Airflow UI (navigation, and a tab on every DAG run)."""

    name = "fedbucket"
    fastapi_apps: ClassVar[list] = [{"app": app, "url_prefix": URL_PREFIX, "name": "fedbucket federation"}]
    external_views: ClassVar[list] = [
        {"name": "Federation", "href": BASE, "destination": "nav", "url_route": "federation"},
        {
            "name": "Federation round",
            "href": BASE + "dags/{DAG_ID}/runs/{RUN_ID}",
            "destination": "dag_run",
            "url_route": "federation-round",
        },
    ]
