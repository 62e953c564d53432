"""The hook: a lazily opened handle on a federation bucket."""

from __future__ import annotations

from functools import cached_property

from airflow.sdk import BaseHook

from fedbucket.storage import ObjectStore, open_store


class FederationHook(BaseHook):
    """Opens the federation's :class:`~fedbucket.storage.ObjectStore` on first use.

    ``gs://`` uses Application Default Credentials (on Composer: the environment's service
    account); ``STORAGE_EMULATOR_HOST`` redirects it to an emulator for tests and demos.
    """

    def __init__(self, bucket: str) -> None:
        super().__init__()
        self.bucket = bucket

    @cached_property
    def store(self) -> ObjectStore:
        return open_store(self.bucket)
