"""Where every object of a federation lives in its bucket. The only place that spells a path.

Object names are relative to the federation root (``gs://bucket/prefix`` or ``file:///dir``)::

    models/current.json                               everyone reads: pointer to the promoted model
    models/<version>/model.safetensors               everyone reads: a promoted global model
    models/<version>/manifest.json                    everyone reads: its manifest (sha256, schema)
    rounds/current.json                               everyone reads: pointer to the open round
    rounds/<round>/task.json                          everyone reads: what clients are asked to do
    rounds/<round>/candidate/model.safetensors        server: the aggregated candidate
    rounds/<round>/candidate/manifest.json            server: candidate manifest with lineage
    rounds/<round>/closing.json                       server: the updates the round closed with
    rounds/<round>/aggregation.json                   server: accepted/rejected updates, timings
    rounds/<round>/evaluation-task.json               everyone reads: the candidate, for clients to score
    rounds/<round>/evaluation-closing.json            server: the client evaluations the gate uses
    rounds/<round>/evaluation.json                    server: candidate vs current metrics
    rounds/<round>/report.json                        server: the round's outcome
    updates/<client>/<round>/<sha256>.safetensors     one client: the update payload
    updates/<client>/<round>/manifest.json            one client: the commit marker
    updates/<client>/<round>/evaluation.json          one client: its scores of candidate and base
    eval/validation.safetensors                       server (optional): validation split, gates promotion
    eval/test.safetensors                             server (optional): test split, reported only
    state/<round>/strategy.safetensors                server: server-optimiser state after a round
    privacy/ledger.json                               server: differential privacy charged per round and client
    rounds/<round>/secagg-setup.json                  everyone reads: secure aggregation keys, graph, threshold
    rounds/<round>/secagg-<phase>.json                everyone reads: who shared keys / sent a masked input
    updates/<client>/<round>/secagg-<step>.json       one client: its keys, shares, inbox (server-written), unmask

The client id comes before the round id in update paths so that one IAM condition
(``resource.name.startsWith(".../objects/updates/<client>/")``) confines a client's writes,
and a client never needs to list the bucket: every name it reads is derived from a pointer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedbucket.protocol.errors import InvalidIdentifier

#: Client ids, round ids and model versions: lowercase-safe names usable in object paths.
IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def check_identifier(value: str, what: str) -> str:
    """Return ``value`` if it is a safe path component, else raise :class:`InvalidIdentifier`.

    Safe means 1-63 characters of ``A-Z a-z 0-9 _ . -``, starting with a letter or digit, and
    no ``..`` (so an id can never climb out of its prefix).
    """
    if not isinstance(value, str) or not IDENTIFIER_PATTERN.fullmatch(value) or ".." in value:
        raise InvalidIdentifier(
            f"{what} {value!r} is not a valid identifier: use 1-63 characters from "
            "A-Z a-z 0-9 _ . - starting with a letter or digit, without '..'"
        )
    return value


@dataclass(frozen=True)
class BucketLayout:
    """Object names of one federation, relative to its root URL."""

    current_model: str = "models/current.json"
    current_round: str = "rounds/current.json"
    validation_split: str = "eval/validation.safetensors"
    test_split: str = "eval/test.safetensors"
    privacy_ledger: str = "privacy/ledger.json"

    def model_payload(self, version: str) -> str:
        return f"models/{check_identifier(version, 'model version')}/model.safetensors"

    def model_manifest(self, version: str) -> str:
        return f"models/{check_identifier(version, 'model version')}/manifest.json"

    def round_prefix(self, round_id: str) -> str:
        return f"rounds/{check_identifier(round_id, 'round id')}/"

    def round_task(self, round_id: str) -> str:
        return self.round_prefix(round_id) + "task.json"

    def candidate_payload(self, round_id: str) -> str:
        return self.round_prefix(round_id) + "candidate/model.safetensors"

    def candidate_manifest(self, round_id: str) -> str:
        return self.round_prefix(round_id) + "candidate/manifest.json"

    def round_closing(self, round_id: str) -> str:
        return self.round_prefix(round_id) + "closing.json"

    def aggregation_report(self, round_id: str) -> str:
        return self.round_prefix(round_id) + "aggregation.json"

    def evaluation_task(self, round_id: str) -> str:
        return self.round_prefix(round_id) + "evaluation-task.json"

    def evaluation_closing(self, round_id: str) -> str:
        return self.round_prefix(round_id) + "evaluation-closing.json"

    def evaluation_report(self, round_id: str) -> str:
        return self.round_prefix(round_id) + "evaluation.json"

    def round_report(self, round_id: str) -> str:
        return self.round_prefix(round_id) + "report.json"

    def strategy_state(self, round_id: str) -> str:
        return f"state/{check_identifier(round_id, 'round id')}/strategy.safetensors"

    def client_prefix(self, client_id: str) -> str:
        return f"updates/{check_identifier(client_id, 'client id')}/"

    def update_prefix(self, client_id: str, round_id: str) -> str:
        return self.client_prefix(client_id) + f"{check_identifier(round_id, 'round id')}/"

    def update_manifest(self, client_id: str, round_id: str) -> str:
        return self.update_prefix(client_id, round_id) + UPDATE_MANIFEST

    def update_payload(self, client_id: str, round_id: str, sha256: str) -> str:
        if not _SHA256_PATTERN.fullmatch(sha256):
            raise InvalidIdentifier(f"payload sha256 {sha256!r} is not 64 lowercase hex digits")
        return self.update_prefix(client_id, round_id) + f"{sha256}.safetensors"

    def client_evaluation(self, client_id: str, round_id: str) -> str:
        return self.update_prefix(client_id, round_id) + CLIENT_EVALUATION

    def secagg_setup(self, round_id: str) -> str:
        return self.round_prefix(round_id) + "secagg-setup.json"

    def secagg_roster(self, round_id: str, phase: str) -> str:
        if phase not in SECAGG_ROSTERS:
            raise ValueError(f"unknown secure-aggregation roster {phase!r}")
        return self.round_prefix(round_id) + f"secagg-{phase}.json"

    def secagg_client(self, client_id: str, round_id: str, step: str) -> str:
        """A client's secure-aggregation document: ``keys``, ``shares``, ``inbox`` or ``unmask``."""
        if step not in SECAGG_CLIENT_STEPS:
            raise ValueError(f"unknown secure-aggregation step {step!r}")
        return self.update_prefix(client_id, round_id) + f"secagg-{step}.json"

    def secagg_client_glob(self, round_id: str, step: str) -> str:
        """A ``match_glob`` for every client's ``step`` document of one round."""
        if step not in SECAGG_CLIENT_STEPS:
            raise ValueError(f"unknown secure-aggregation step {step!r}")
        return f"updates/*/{check_identifier(round_id, 'round id')}/secagg-{step}.json"

    def parse_secagg_client(self, name: str, step: str) -> tuple[str, str]:
        """``(client_id, round_id)`` of ``updates/<client>/<round>/secagg-<step>.json``."""
        return _parse_client_object(name, f"secagg-{step}.json")

    def update_manifest_glob(self, round_id: str) -> str:
        """A ``match_glob`` pattern for every client's manifest of one round (and nothing else)."""
        return f"updates/*/{check_identifier(round_id, 'round id')}/{UPDATE_MANIFEST}"

    def client_evaluation_glob(self, round_id: str) -> str:
        """A ``match_glob`` pattern for every client's evaluation of one round."""
        return f"updates/*/{check_identifier(round_id, 'round id')}/{CLIENT_EVALUATION}"

    def parse_update_manifest(self, name: str) -> tuple[str, str]:
        """Return ``(client_id, round_id)`` of an update manifest's object name.

        Raises :class:`InvalidIdentifier` for anything that is not exactly
        ``updates/<client>/<round>/manifest.json`` with safe ids.
        """
        return _parse_client_object(name, UPDATE_MANIFEST)

    def parse_client_evaluation(self, name: str) -> tuple[str, str]:
        """Return ``(client_id, round_id)`` of ``updates/<client>/<round>/evaluation.json``."""
        return _parse_client_object(name, CLIENT_EVALUATION)


UPDATE_MANIFEST = "manifest.json"
SECAGG_ROSTERS = ("shared", "masked")
SECAGG_CLIENT_STEPS = ("keys", "shares", "inbox", "unmask")
CLIENT_EVALUATION = "evaluation.json"


def _parse_client_object(name: str, filename: str) -> tuple[str, str]:
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "updates" or parts[3] != filename:
        raise InvalidIdentifier(f"{name!r} is not an updates/<client>/<round>/{filename} path")
    return check_identifier(parts[1], "client id"), check_identifier(parts[2], "round id")


LAYOUT = BucketLayout()
