"""Static checks of terraform/: formatting, checkov, and the security properties the design
promises, asserted on the parsed HCL (no provider download needed).

terraform/ is a callable module (no provider block); terraform/examples/*/ are root configurations
that configure the provider and call it. Both are parsed and scanned."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import hcl2
import pytest

TERRAFORM = Path(__file__).resolve().parents[1] / "terraform"
EXAMPLES = TERRAFORM / "examples"
TOOLS = Path(__file__).resolve().parents[1] / ".tools-venv" / "bin"
PRIMITIVE_ROLES = {"roles/owner", "roles/editor", "roles/viewer"}
BUCKETS = {"federation", "artifacts", "access_logs"}

# Every resource type the module uses, by whether the google provider lets it name a project. One
# that takes `project` but leaves it out lands in the provider's default project, which the module's
# caller chooses; so each of these must set it. A new resource type must be added to one of the sets.
TAKES_PROJECT = {
    "google_storage_bucket",
    "google_service_account",
    "google_project_iam_member",
    "google_compute_network",
    "google_compute_subnetwork",
    "google_compute_firewall",
    "google_dataproc_autoscaling_policy",
    "google_composer_environment",
    "google_secret_manager_secret",
    "google_secret_manager_secret_iam_member",
}
NO_PROJECT_ARGUMENT = {  # scoped by the bucket or service account they name
    "google_storage_bucket_object",
    "google_storage_bucket_iam_member",
    "google_service_account_iam_member",
}


def _clean(value):
    """python-hcl2 keeps HCL's quotes on keys and strings, marks blocks and keeps comments; drop them."""
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items() if not (k.startswith("__") and k.endswith("__"))}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


BLOCK_SECTIONS = {"variable": "variables", "output": "outputs", "locals": "locals", "module": "modules"}


def load(folder: Path = TERRAFORM) -> dict:
    """Every top-level block of the *.tf files of one folder (not its subfolders)."""
    config = {
        "resources": {}, "variables": {}, "outputs": {}, "locals": {}, "modules": {},
        "providers": [], "terraform": [], "moved": [], "text": "",
    }  # fmt: skip
    for path in sorted(folder.glob("*.tf")):
        config["text"] += path.read_text()
        with path.open() as f:
            parsed = _clean(hcl2.load(f))
        for block in parsed.get("resource", []):
            for rtype, named in block.items():
                for name, body in named.items():
                    config["resources"][(rtype, name)] = body
        for key, section in BLOCK_SECTIONS.items():
            for block in parsed.get(key, []):
                config[section].update(block)
        config["providers"] += parsed.get("provider", [])
        config["terraform"] += parsed.get("terraform", [])
        config["moved"] += parsed.get("moved", [])
    return config


@pytest.fixture(scope="module")
def tf() -> dict:
    return load()


@pytest.fixture(scope="module")
def examples() -> dict[str, dict]:
    found = {path.name: load(path) for path in sorted(EXAMPLES.iterdir()) if list(path.glob("*.tf"))}
    assert found, f"no example root configuration under {EXAMPLES}"
    return found


def _required_providers(config: dict) -> dict:
    blocks = [req for block in config["terraform"] for req in block["required_providers"]]
    return {name: spec for req in blocks for name, spec in req.items()}


def test_terraform_fmt():
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.fail("terraform is not on PATH: install Terraform >= 1.5 (CI images have it)")
    run = subprocess.run([terraform, "fmt", "-check", "-recursive", str(TERRAFORM)], capture_output=True, text=True)
    assert run.returncode == 0, f"terraform fmt would change: {run.stdout}"


def test_checkov_finds_nothing():
    if not (TOOLS / "checkov").exists():
        pytest.fail("checkov is missing: run `make test` (it builds .tools-venv)")
    # -d is recursive: the module and terraform/examples/*, which checkov follows into the module.
    run = subprocess.run(
        [str(TOOLS / "checkov"), "-d", str(TERRAFORM), "--framework", "terraform", "--skip-download",
         "--output", "json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    report = json.loads(run.stdout)
    summary = report["summary"]
    assert summary["failed"] == 0, [c["check_id"] for c in report["results"]["failed_checks"]]
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 30
    # every suppression is inline and carries a reason
    for check in report["results"]["skipped_checks"]:
        assert check["check_result"].get("suppress_comment"), check["check_id"]
    passed = report["results"]["passed_checks"]
    # the example was scanned, and through its module call so was the module
    assert any(c.get("caller_file_path", "").startswith("/examples/") for c in passed)
    # the one bucket definition passes the bucket checks: uniform access, public access prevention,
    # versioning, access logging
    bucket_checks = {c["check_id"] for c in passed if c["resource"].endswith("google_storage_bucket.buckets")}
    assert {"CKV_GCP_29", "CKV_GCP_114", "CKV_GCP_78", "CKV_GCP_62"} <= bucket_checks


def test_every_input_is_typed_described_and_validated(tf, examples):
    for name, body in tf["variables"].items():
        assert body.get("type"), f"variable {name} has no type"
        assert len(body.get("description", "")) > 20, f"variable {name} needs a description"
        if body["type"] != "bool":
            assert body.get("validation"), f"variable {name} has no validation block"
            for rule in body["validation"]:
                assert len(rule["error_message"]) > 30, f"variable {name}: say what a valid value looks like"
    # the examples only carry values in: typed and described; the module validates them
    for example, config in examples.items():
        for name, body in config["variables"].items():
            assert body.get("type") and len(body.get("description", "")) > 20, f"{example}: variable {name}"


def test_the_module_has_no_provider_and_the_examples_configure_it(tf, examples):
    assert tf["providers"] == [], "terraform/ is a callable module: configure the provider in the caller"
    module_providers = _required_providers(tf)
    google = module_providers["google"]
    assert google["source"] == "hashicorp/google"
    assert re.fullmatch(r">= ?[\d.]+, ?< ?[\d.]+", google["version"]), "a version range: >= tested, < next major"
    required_inputs = {name for name, body in tf["variables"].items() if "default" not in body}
    for example, config in examples.items():
        (provider,) = config["providers"]
        assert provider["google"]["project"] == "${var.project_id}", example
        assert _required_providers(config) == module_providers, f"{example}: same provider range as the module"
        (call,) = config["modules"].values()
        assert Path(EXAMPLES / example / call["source"]).resolve() == TERRAFORM, f"{example} calls the module"
        arguments = set(call) - {"source"}
        assert required_inputs <= arguments, f"{example} misses {required_inputs - arguments}"
        assert arguments <= set(tf["variables"]), f"{example} passes unknown inputs {arguments - set(tf['variables'])}"
        # `terraform output` works from the example folder as docs/deploy.md shows it
        (name,) = config["modules"]
        assert {o: b["value"] for o, b in config["outputs"].items()} == {
            o: f"${{module.{name}.{o}}}" for o in tf["outputs"]
        }, f"{example} re-exports every output of the module"


def test_every_resource_sets_project(tf):
    for (rtype, name), body in tf["resources"].items():
        assert rtype in TAKES_PROJECT | NO_PROJECT_ARGUMENT, f"{rtype}: add it to TAKES_PROJECT or NO_PROJECT_ARGUMENT"
        if rtype in TAKES_PROJECT:
            assert body.get("project") == "${var.project_id}", f"{rtype}.{name} must set project = var.project_id"


def test_references_resolve(tf, examples):
    """What `terraform validate` would catch first, without the provider: every resource, variable,
    local and module output that is referenced is declared."""
    text = re.sub(r"(?m)^\s*from\s*=.*$", "", tf["text"])  # what a `moved` block moves from is gone
    for rtype, name in re.findall(r"(?<![\w.])(google_[a-z0-9_]+)\.([a-z0-9_]+)", text):
        assert (rtype, name) in tf["resources"], f"{rtype}.{name} is referenced but not declared"
    for name in re.findall(r"\bvar\.(\w+)", text):
        assert name in tf["variables"], f"var.{name} is not declared"
    for name in re.findall(r"\blocal\.(\w+)", text):
        assert name in tf["locals"], f"local.{name} is not declared"
    for example, config in examples.items():
        for name in re.findall(r"\bvar\.(\w+)", config["text"]):
            assert name in config["variables"], f"{example}: var.{name} is not declared"
        for output in re.findall(r"\bmodule\.\w+\.(\w+)", config["text"]):
            assert output in tf["outputs"], f"{example}: the module has no output {output}"


def test_buckets_are_hardened_by_one_definition(tf):
    definitions = {name: body for (rtype, name), body in tf["resources"].items() if rtype == "google_storage_bucket"}
    assert list(definitions) == ["buckets"], "one google_storage_bucket definition for all buckets"
    bucket = definitions["buckets"]
    specs = tf["locals"]["buckets"]
    assert bucket["for_each"] == "${local.buckets}" and set(specs) == BUCKETS
    # Literal values on the for_each resource, so they hold for every key: no spec can opt out.
    for key in specs:
        assert bucket.get("uniform_bucket_level_access") is True, key
        assert bucket.get("public_access_prevention") == "enforced", key
        assert bucket.get("versioning") == [{"enabled": True}], key
        assert bucket.get("force_destroy") is False, key
        assert bucket.get("project") == "${var.project_id}", key
        assert bucket.get("location") == "${var.region}", key
    (noncurrent,) = bucket["lifecycle_rule"]  # every bucket: old versions are kept, then removed
    assert noncurrent["condition"][0]["days_since_noncurrent_time"] == "${var.noncurrent_version_retention_days}"
    assert noncurrent["condition"][0]["with_state"] == "ARCHIVED"
    dynamic = {name: body for block in bucket["dynamic"] for name, body in block.items()}
    assert set(dynamic) == {"lifecycle_rule", "encryption", "retention_policy", "logging"}
    # CMEK: one key for all three buckets, not per spec
    assert "var.kms_key_name" in dynamic["encryption"]["for_each"]
    assert "each.value" not in dynamic["encryption"]["for_each"]
    assert dynamic["lifecycle_rule"]["for_each"] == "${each.value.lifecycle_rules}"
    assert "each.value.log_bucket" in dynamic["logging"]["for_each"]
    assert "each.value.retention_seconds" in dynamic["retention_policy"]["for_each"]
    for rule in (rule for spec in specs.values() for rule in spec["lifecycle_rules"]):
        if rule.get("with_state") == "ARCHIVED":  # a rule on noncurrent versions: bounded by their age
            assert rule.get("days_since_noncurrent_time") and "age" not in rule
        else:
            assert rule.get("age"), "a Delete rule on live objects without an age would delete everything"
    # existing deployments keep their buckets: the three former resources move to their keys
    moves = {m["from"]: m["to"] for m in tf["moved"]}
    for key in BUCKETS:
        assert moves.get(f"${{google_storage_bucket.{key}}}") == f'${{google_storage_bucket.buckets["{key}"]}}', key


def test_access_logs_reach_their_bucket(tf):
    specs = tf["locals"]["buckets"]
    assert specs["access_logs"]["name"] == "${local.access_log_bucket}"
    assert specs["federation"]["log_bucket"] == specs["artifacts"]["log_bucket"] == "${local.access_log_bucket}"
    assert specs["access_logs"]["log_bucket"] is None  # it is the log bucket; logging into itself would loop
    # with uniform bucket-level access the usage-log writer needs an IAM role on the log bucket
    delivery = [
        body
        for (rtype, _), body in tf["resources"].items()
        if rtype == "google_storage_bucket_iam_member" and body["member"] == "group:cloud-storage-analytics@google.com"
    ]
    assert delivery == [
        {
            "bucket": '${google_storage_bucket.buckets["access_logs"].name}',
            "role": "roles/storage.objectCreator",
            "member": "group:cloud-storage-analytics@google.com",
        }
    ]


def test_federation_bucket_is_locked_down(tf):
    spec = tf["locals"]["buckets"]["federation"]
    assert spec["name"] == "${var.bucket_name}"  # the bucket the IAM conditions (local.objects_root) name
    prefixes = [p for rule in spec["lifecycle_rules"] for p in rule.get("matches_prefix", [""])]
    assert "${var.federation_prefix}/updates/" in prefixes  # old updates expire
    assert not any(p.endswith("/models/") for p in prefixes)  # promoted models are retained
    parts = [r for r in spec["lifecycle_rules"] if r.get("matches_suffix") == [".part"]]
    # GCSStore's assembly parts: what a killed job's executors wrote, and the deleted ones' old versions
    assert {(r.get("age"), r.get("days_since_noncurrent_time")) for r in parts} == {(None, 1), (1, None)}
    assert spec["retention_seconds"] == "${var.audit_retention_seconds}"  # optional audit retention
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
    assert own["bucket"] == read["bucket"] == '${google_storage_bucket.buckets["federation"].name}'
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


def _client_may(tf: dict, role_binding: str, client: str, name: str) -> bool:
    """Evaluate a client binding's IAM condition (CEL: startsWith/endsWith/==, && and ||) on the
    object ``name`` (relative to the federation prefix), as Cloud Storage would."""
    expression = tf["resources"][("google_storage_bucket_iam_member", role_binding)]["condition"][0]["expression"]
    root = "projects/_/buckets/b/objects/fed/"
    cel = expression.replace("${local.objects_root}", root).replace("${each.key}", client)
    if cel.startswith("${join("):  # ${join(" || ", ["a", "b", ...])} as written in HCL
        cel = " || ".join(json.loads(cel[len('${join(" || ", ') : -len(")}")]))
    cel = cel.replace('\\"', '"')  # HCL's escaped quotes
    python = cel.replace("&&", " and ").replace("||", " or ").replace("resource.name", "name")
    python = python.replace(".startsWith(", ".startswith(").replace(".endsWith(", ".endswith(")
    return bool(eval(python, {"__builtins__": {}}, {"name": root + name}))


def test_a_client_reads_the_secure_aggregation_setup_and_its_inbox_and_nothing_of_another_client(tf):
    """Issue 12: the public setup and rosters and a client's own inbox are readable by it; another
    client's keys, shares, inbox, masked input and unmask answers are not; round reports are not."""
    readable = {
        "rounds/r1/secagg-setup.json",
        "rounds/r1/secagg-shared.json",
        "rounds/r1/secagg-masked.json",
        "rounds/r1/task.json",
        "updates/alice/r1/secagg-inbox.json",
        "updates/alice/r1/secagg-shares.json",
    }
    private = {
        "updates/bob/r1/secagg-inbox.json",
        "updates/bob/r1/secagg-shares.json",
        "updates/bob/r1/secagg-keys.json",
        "updates/bob/r1/secagg-unmask.json",
        "updates/bob/r1/manifest.json",
        "rounds/r1/aggregation.json",
        "rounds/r1/closing.json",
        "rounds/r1/report.json",
    }

    def may(name: str) -> bool:
        return any(_client_may(tf, b, "alice", name) for b in ("client_own_updates", "client_read_round"))

    assert {n for n in readable | private if may(n)} == readable


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


def test_only_the_dataproc_account_reads_the_dp_noise_key_and_terraform_never_holds_it(tf):
    """docs/privacy.md: the key that makes DP noise unsubtractable is readable by the aggregation job only."""
    grants = [
        body for (rtype, _), body in tf["resources"].items() if rtype == "google_secret_manager_secret_iam_member"
    ]
    assert [(g["role"], g["member"]) for g in grants] == [
        ("roles/secretmanager.secretAccessor", "${google_service_account.dataproc.member}")
    ]
    assert not any(rtype == "google_secret_manager_secret_version" for rtype, _ in tf["resources"])  # no value in state
    secret = tf["resources"][("google_secret_manager_secret", "dp_key")]
    assert "user_managed" in str(secret["replication"])  # stays in the federation's region
