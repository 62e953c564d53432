"""docs/protocol.md matches the code; documents are versioned and strict."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedbucket import LAYOUT, RoundPointer, SchemaError, UnsupportedSchemaVersion, UpdateManifest, parse_document
from fedbucket.protocol.documents import ALL_DOCUMENTS, document_class

PROTOCOL = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def documented_examples() -> list[dict]:
    blocks = re.findall(r"```json\n(.*?)```", PROTOCOL.read_text(), flags=re.S)
    return [json.loads(b) for b in blocks]


def test_every_documented_example_parses_with_its_model():
    examples = documented_examples()
    kinds = set()
    for example in examples:
        cls = document_class(example["kind"])
        doc = parse_document(cls, json.dumps(example))
        kinds.add(cls.kind)
        # canonical bytes round-trip to the same document
        assert parse_document(cls, doc.to_json_bytes()) == doc
    assert kinds == {cls.kind for cls in ALL_DOCUMENTS}, "every document kind has an example in docs/protocol.md"


def test_documented_layout_matches_the_code():
    text = PROTOCOL.read_text()
    sha = "0" * 64
    names = [
        LAYOUT.current_model,
        LAYOUT.current_round,
        LAYOUT.validation_split,
        LAYOUT.model_payload("VERSION"),
        LAYOUT.model_manifest("VERSION"),
        LAYOUT.round_task("ROUND"),
        LAYOUT.candidate_payload("ROUND"),
        LAYOUT.candidate_manifest("ROUND"),
        LAYOUT.round_closing("ROUND"),
        LAYOUT.aggregation_report("ROUND"),
        LAYOUT.evaluation_report("ROUND"),
        LAYOUT.round_report("ROUND"),
        LAYOUT.strategy_state("ROUND"),
        LAYOUT.update_payload("CLIENT", "ROUND", sha),
        LAYOUT.update_manifest("CLIENT", "ROUND"),
    ]
    for name in names:
        documented = (
            name.replace("VERSION", "<version>").replace("ROUND", "<round>").replace("CLIENT", "<client>")
        ).replace(sha, "<sha256>")
        assert documented in text, f"{documented} is not in docs/protocol.md"


def test_unknown_schema_version_is_refused_clearly():
    raw = json.dumps({"kind": "round-pointer", "schema_version": 3, "round_id": "r1", "status": "open"})
    with pytest.raises(UnsupportedSchemaVersion, match=r"schema_version 3 is not supported.*reads \[1, 2\]"):
        parse_document(RoundPointer, raw)


def test_a_version_1_document_reads_with_the_new_fields_at_their_defaults():
    """Version 2 added task packages and federated evaluation; version-1 documents still read."""
    from fedbucket.protocol.documents import RoundTask

    old = {
        "kind": "round-task", "schema_version": 1, "round_id": "r1", "base_model_version": "init",
        "base_model_sha256": "0" * 64, "model": {"name": "mlp", "kwargs": {"hidden": 64}},
        "opened_at": "2026-11-25T12:00:00Z", "deadline": "2026-11-25T12:10:00Z",
        "training": {"local_epochs": 2, "batch_size": 32, "learning_rate": 0.05, "proximal_mu": 0.0},
        "tensors": {}, "max_update_bytes": 10,
    }  # fmt: skip
    task = parse_document(RoundTask, json.dumps(old))
    assert task.model.task is None and task.training.extra == {} and task.federated_evaluation is False
    assert json.loads(task.to_json_bytes())["schema_version"] == 1  # read as it was written
    with pytest.raises(UnsupportedSchemaVersion):
        parse_document(RoundPointer, json.dumps({"kind": "round-pointer", "round_id": "r1", "status": "open"}))


def test_wrong_kind_extra_fields_and_bad_values_are_refused():
    pointer = {"kind": "round-pointer", "schema_version": 1, "round_id": "r1", "status": "open"}
    with pytest.raises(SchemaError, match="expected a 'update-manifest' document"):
        parse_document(UpdateManifest, json.dumps(pointer))
    with pytest.raises(SchemaError, match="Extra inputs"):
        parse_document(RoundPointer, json.dumps(pointer | {"surprise": 1}))
    with pytest.raises(SchemaError, match="status"):
        parse_document(RoundPointer, json.dumps(pointer | {"status": "maybe"}))
    with pytest.raises(SchemaError, match="round_id"):
        parse_document(RoundPointer, json.dumps(pointer | {"round_id": "../etc"}))
    with pytest.raises(SchemaError, match="not valid JSON"):
        parse_document(RoundPointer, b"{")


def test_update_manifest_requires_timezone_and_finite_metrics():
    example = next(e for e in documented_examples() if e["kind"] == "update-manifest")
    with pytest.raises(SchemaError, match="time"):
        parse_document(UpdateManifest, json.dumps(example | {"created_at": "2026-11-25T12:04:31"}))
    with pytest.raises(SchemaError, match="finite"):
        parse_document(UpdateManifest, json.dumps(example).replace("0.213", "NaN"))
    with pytest.raises(SchemaError, match="num_examples"):
        parse_document(UpdateManifest, json.dumps(example | {"num_examples": 0}))


def test_import_fedbucket_loads_the_protocol_and_the_client_only():
    """The static contract is import-linter's (make lint); this checks what really loads at run time."""
    import subprocess
    import sys

    code = (
        "import sys, fedbucket; "
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('fedbucket.')})); "
        "print(any(m in sys.modules for m in ('torch', 'pyspark', 'airflow')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "['client', 'protocol']" and out[1] == "False"


def test_strict_parsing_refuses_coercion():
    raw = json.loads(UpdateManifest(
        client_id="a", round_id="r", base_model_version="init", num_examples=5, sha256="0" * 64, size_bytes=3,
        created_at="2026-11-25T12:00:00Z",
    ).to_json_bytes())  # fmt: skip
    with pytest.raises(UnsupportedSchemaVersion):
        parse_document(UpdateManifest, json.dumps(raw | {"schema_version": True}))
    with pytest.raises(SchemaError, match="num_examples"):
        parse_document(UpdateManifest, json.dumps(raw | {"num_examples": "5"}))
    assert parse_document(UpdateManifest, json.dumps(raw)).num_examples == 5
