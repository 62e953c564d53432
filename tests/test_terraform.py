"""Static checks of terraform/: formatting, checkov, and the security properties the design
promises, asserted on the parsed HCL (no provider download needed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import hcl2
import pytest

TERRAFORM = Path(__file__).resolve().parents[1] / "terraform"
TOOLS = Path(__file__).resolve().parents[1] / ".tools-venv" / "bin"
PRIMITIVE_ROLES = {"roles/owner", "roles/editor", "roles/viewer"}


def _clean(value):
    """python-hcl2 keeps HCL's quotes on keys and strings and marks blocks; drop both."""
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items() if k != "__is_block__"}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def load() -> dict:
    resources, variables, text = {}, {}, ""
    for path in sorted(TERRAFORM.glob("*.tf")):
        text += path.read_text()
        with path.open() as f:
            parsed = _clean(hcl2.load(f))
        for block in parsed.get("resource", []):
            for rtype, named in block.items():
                for name, body in named.items():
                    resources[(rtype, name)] = body
        for block in parsed.get("variable", []):
            variables.update(block)
    return {"resources": resources, "variables": variables, "text": text}


@pytest.fixture(scope="module")
def tf() -> dict:
    return load()


def test_terraform_fmt():
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.fail("terraform is not on PATH: install Terraform >= 1.5 (CI images have it)")
    run = subprocess.run([terraform, "fmt", "-check", "-recursive", str(TERRAFORM)], capture_output=True, text=True)
    assert run.returncode == 0, f"terraform fmt would change: {run.stdout}"


def test_checkov_finds_nothing():
    if not (TOOLS / "checkov").exists():
        pytest.fail("checkov is missing: run `make test` (it builds .tools-venv)")
    run = subprocess.run(
        [str(TOOLS / "checkov"), "-d", str(TERRAFORM), "--framework", "terraform", "--skip-download",
         "--output", "json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    report = json.loads(run.stdout)
    summary = report["summary"]
    assert summary["failed"] == 0, [c["check_id"] for c in report["results"]["failed_checks"]]
    assert summary["passed"] > 30
    # every suppression is inline and carries a reason
    for check in report["results"]["skipped_checks"]:
        assert check["check_result"].get("suppress_comment"), check["check_id"]


def test_every_input_is_typed_described_and_validated(tf):
    for name, body in tf["variables"].items():
        assert body.get("type"), f"variable {name} has no type"
        assert len(body.get("description", "")) > 20, f"variable {name} needs a description"
        if body["type"] != "bool":
            assert body.get("validation"), f"variable {name} has no validation block"


def test_federation_bucket_is_locked_down(tf):
    bucket = tf["resources"][("google_storage_bucket", "federation")]
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    assert bucket["versioning"][0]["enabled"] is True
    prefixes = [r["condition"][0].get("matches_prefix", [""])[0] for r in bucket["lifecycle_rule"]]
    assert "${var.federation_prefix}/updates/" in prefixes  # old updates expire
    assert not any(p.endswith("/models/") for p in prefixes)  # promoted models are retained
    dynamic = {name for block in bucket.get("dynamic", []) for name in block}
    assert {"encryption", "retention_policy"} <= dynamic  # optional CMEK and audit retention
    for (rtype, name), body in tf["resources"].items():
        if rtype == "google_storage_bucket":
            assert body["public_access_prevention"] == "enforced", name


def test_no_ingress_from_the_internet(tf):
    firewalls = {n: b for (t, n), b in tf["resources"].items() if t == "google_compute_firewall"}
    assert firewalls
    for name, rule in firewalls.items():
        assert "0.0.0.0/0" not in rule.get("source_ranges", []), name
    ssh = firewalls["iap_ssh"]
    assert ssh["source_ranges"] == ["35.235.240.0/20"] and ssh["allow"][0]["ports"] == ["22"]
    internal = firewalls["dataproc_internal"]
    assert internal["source_tags"] == internal["target_tags"] == ["${local.dataproc_tag}"]
    subnet = tf["resources"][("google_compute_subnetwork", "dataproc")]
    assert subnet["private_ip_google_access"] is True


def test_clients_are_confined_to_their_prefix_and_cannot_list(tf):
    own = tf["resources"][("google_storage_bucket_iam_member", "client_own_updates")]
    read = tf["resources"][("google_storage_bucket_iam_member", "client_read_round")]
    assert own["for_each"] == read["for_each"] == "${var.clients}"
    own_expr = own["condition"][0]["expression"]
    assert "startsWith" in own_expr and "updates/${each.key}/" in own_expr
    read_expr = json.dumps(read["condition"])
    for allowed in ("models/", "rounds/current.json", "/task.json"):
        assert allowed in read_expr
    assert "updates/" not in read_expr  # no reading other clients' updates
    # no client binding without a condition, no bucket-level list role for clients
    for (rtype, name), body in tf["resources"].items():
        if "client" in name and rtype.endswith("_iam_member"):
            assert body.get("condition"), f"{name} grants a client access without an IAM condition"


def test_no_primitive_roles_and_no_default_service_account(tf):
    for (rtype, name), body in tf["resources"].items():
        assert body.get("role") not in PRIMITIVE_ROLES, f"{rtype}.{name} uses a primitive role"
    assert "compute@developer.gserviceaccount.com" not in tf["text"]
    assert re.search(r"service_account\s*=\s*google_service_account\.dataproc\.email", tf["text"])


def test_cluster_template_is_private_shielded_and_bounded(tf):
    text = tf["text"]
    block = text[text.index("dataproc_cluster_config = merge(") :]
    assert "internal_ip_only = true" in block
    assert "enable_secure_boot          = true" in block
    assert "idle_delete_ttl" in block and "auto_delete_ttl" in block
    assert "image_version = var.dataproc_image_version" in block
    assert "tags = [local.dataproc_tag]" in block
