"""The fedbucket Airflow plugin: the Federation page in the Airflow 3 UI (a navigation entry and a
tab on every DAG run), served by :mod:`fedbucket_airflow.federation_app` at ``/fedbucket``.

Airflow imports every module of the plugins folder in every process that loads plugins (task
runs, the scheduler, ``dag.test()``), so this one stays light: the app is imported on its first
request, inside the API server only.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/fedbucket"


class LazyFederationApp:
    """An ASGI app that imports the real one on its first request."""

    def __init__(self) -> None:
        self._app: Any = None
        self._lock = threading.Lock()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    from fedbucket_airflow.federation_app import app

                    self._app = app
        await self._app(scope, receive, send)

    def __str__(self) -> str:  # what /api/v2/plugins lists
        return "fedbucket_airflow.federation_app:app"


class FederationPlugin(AirflowPlugin):
    """Adds the Federation page to the Airflow UI (navigation, and a tab on every DAG run)."""

    name = "fedbucket"
    fastapi_apps: ClassVar[list] = [
        {"app": LazyFederationApp(), "url_prefix": URL_PREFIX, "name": "fedbucket federation"}
    ]
    external_views: ClassVar[list] = [
        {"name": "Federation", "href": URL_PREFIX + "/", "destination": "nav", "url_route": "federation"},
        {
            "name": "Federation round",
            "href": URL_PREFIX + "/dags/{DAG_ID}/runs/{RUN_ID}",
            "destination": "dag_run",
            "url_route": "federation-round",
        },
    ]
