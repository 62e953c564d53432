"""The client side: take part in rounds through the bucket (:class:`Client`) and the client commands
of the ``fedbucket`` CLI (``status``, ``fetch``, ``submit``).

Imports only :mod:`fedbucket.protocol`; never server code (an import-linter contract checks it).
"""

from fedbucket.client.sdk import (
    Client,
    Progress,
    StateDict,
    apply_delta,
    compute_delta,
    to_numpy,
    upload_delta,
    upload_update,
)

__all__ = [
    "Client",
    "Progress",
    "StateDict",
    "apply_delta",
    "compute_delta",
    "to_numpy",
    "upload_delta",
    "upload_update",
]
