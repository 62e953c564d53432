"""The hook: a lazily opened handle on a federation bucket."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

from airflow.sdk import BaseHook

from fedbucket.protocol.storage import ObjectStore, open_store


class FederationHook(BaseHook):
    """Opens the federation's :class:`~fedbucket.protocol.storage.ObjectStore` on first use.

    :param bucket: federation URL, ``gs://bucket/prefix`` or ``file:///dir``.
    :param gcp_conn_id: for ``gs://``: an Airflow Google Cloud connection to take credentials
        from (as the Google provider's hooks do). ``None``: Application Default Credentials (on
        Composer, the environment's service account); ``STORAGE_EMULATOR_HOST`` redirects to an
        emulator for tests and demos.
    :param impersonation_chain: a service account (or chain) to impersonate with that
        connection's credentials; needs ``gcp_conn_id``.
    """

    conn_name_attr = "gcp_conn_id"
    hook_name = "fedbucket federation"

    def __init__(
        self, bucket: str, *, gcp_conn_id: str | None = None, impersonation_chain: str | Sequence[str] | None = None
    ) -> None:
        super().__init__()
        self.bucket = bucket
        self.gcp_conn_id = gcp_conn_id
        self.impersonation_chain = impersonation_chain

    @cached_property
    def store(self) -> ObjectStore:
        credentials = None
        if self.bucket.startswith("gs://") and self.gcp_conn_id:
            from airflow.providers.google.common.hooks.base_google import GoogleBaseHook

            google = GoogleBaseHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)
            credentials, _ = google.get_credentials_and_project_id()
        return open_store(self.bucket, credentials=credentials)
