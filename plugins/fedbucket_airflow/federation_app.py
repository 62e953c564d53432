"""The Federation pages: the FastAPI app the fedbucket plugin (:mod:`fedbucket_airflow.ui`)
mounts in the Airflow API server at ``/fedbucket``.

The pages are rendered on the server from the federation's bucket by
:mod:`fedbucket.server.report_html` (the same code as ``fedbucket report``), with plots as inline SVG:
no JavaScript, nothing fetched from elsewhere. Airflow does not protect a plugin's routes by itself:
the whole app requires read access to the round DAG (``requires_access_dag``: the UI's ``_token``
cookie or a bearer token, and the user's permissions); a browser without a session is sent to
Airflow's login page and back. Links are built from the request's root path, so the pages work
under an ``[api] base_url`` with a sub-path.

This module is imported on the first request only (it pulls in Airflow's API security code); it is
listed in ``plugins/.airflowignore`` so that processes that merely load plugins never import it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import quote

from airflow.api_fastapi.core_api.security import requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fedbucket.server.config import FederationConfig
from fedbucket.server.federation import FederationView
from fedbucket.server.report_html import clients_page, esc, models_page, overview_page, page, round_page
from fedbucket_airflow.hooks import FederationHook

URL_PREFIX = "/fedbucket"
ROUND_DAG_ID = "fedbucket_round"
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "dags" / "federation.toml"

app = FastAPI(
    title="fedbucket: the federation",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
    dependencies=[Depends(requires_access_dag("GET", param_dag_id=ROUND_DAG_ID))],  # who may see the round DAG
)


def base(request: Request) -> str:
    """This app's URL prefix as the browser sees it (the mount point, under any root path)."""
    return request.scope.get("root_path", URL_PREFIX).rstrip("/") + "/"


def airflow_root(request: Request) -> str:
    """Airflow's own prefix (``[api] base_url``'s path), for links to runs and the login page."""
    root = request.scope.get("root_path", URL_PREFIX).rstrip("/")
    return root[: -len(URL_PREFIX)] if root.endswith(URL_PREFIX) else ""


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
        return RedirectResponse(f"{airflow_root(request)}/api/v2/auth/login?next={quote(back)}", status_code=307)
    body = f"<h1>{exc.status_code}</h1><p>{esc(exc.detail)}</p>"
    return HTMLResponse(page(f"{exc.status_code}", body, base=base(request)), status_code=exc.status_code)


@app.get("/", response_class=HTMLResponse)
def rounds(request: Request, page: int = 1) -> str:
    return overview_page(federation(), base=base(request), page_number=page)


@app.get("/rounds/{round_id}", response_class=HTMLResponse)
def one_round(request: Request, round_id: str) -> str:
    text = round_page(federation(), round_id, base=base(request), airflow=airflow_root(request))
    if text is None:
        raise HTTPException(404, f"round {round_id} has no report yet (it may still be running)")
    return text


@app.get("/models", response_class=HTMLResponse)
def models(request: Request, a: str | None = None, b: str | None = None) -> str:
    return models_page(federation(), base=base(request), a=a, b=b)


@app.get("/clients", response_class=HTMLResponse)
def clients(request: Request, page: int = 1) -> str:
    return clients_page(federation(), base=base(request), page_number=page)


@app.get("/dags/{dag_id}/runs/{run_id}")
def dag_run(request: Request, dag_id: str, run_id: str) -> Response:
    """The round a DAG run made (the tab on a DAG run's page): found among the cached rows."""
    view = federation()
    for row in reversed(view.rounds()):
        if row.airflow.get("dag_id") == dag_id and row.airflow.get("run_id") == run_id:
            return RedirectResponse(f"{base(request)}rounds/{quote(row.round_id)}", status_code=307)
    body = f"<h1>{esc(dag_id)} / {esc(run_id)}</h1><p>This run has not written a round report (yet).</p>"
    return HTMLResponse(page("fedbucket: run", body, base=base(request), bucket=view.store.url))
