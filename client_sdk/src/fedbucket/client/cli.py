"""The client commands of the ``fedbucket`` CLI: ``status``, ``fetch``, ``submit``.

Each command takes the parsed arguments and returns an exit code; errors are raised from the
:mod:`fedbucket.protocol.errors` tree and turned into one line and an exit code by
:func:`fedbucket.cli.main`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from fedbucket.client.sdk import Client, Progress
from fedbucket.protocol.documents import ModelManifest, ModelPointer, read_document, read_optional, utcnow
from fedbucket.protocol.errors import ConfigError, InvalidIdentifier, RoundNotOpen
from fedbucket.protocol.layout import check_identifier
from fedbucket.protocol.storage import open_store
from fedbucket.protocol.tensors import load_tensors

# The two exit codes these commands return themselves; the table is fedbucket.cli.EXIT_CODES (which the
# client may not import: the CLI entry point sits above the role packages). tests/test_cli.py checks they agree.
EXIT_OK, EXIT_NO_ROUND = 0, 3


_PHASE_LABELS = {
    "download": "download",
    "delta": "delta + validate",
    "validate": "validate",
    "upload": "upload",
}


def _progress_bar(label: str) -> tuple[Progress, Callable[[], None]]:
    """A progress bar on stderr that follows the SDK's phases: it restarts for each phase and says
    which one it shows (``<label>: upload``)."""
    from tqdm import tqdm

    bar = tqdm(total=0, desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)
    current = [""]

    def update(phase: str, done: int, total: int) -> None:
        if phase != current[0]:
            current[0] = phase
            bar.reset(total=total)
            bar.set_description(f"{label}: {_PHASE_LABELS.get(phase, phase)}")
        bar.update(done - bar.n)

    return update, bar.close


def open_client(args: argparse.Namespace) -> Client:
    """The :class:`Client` the arguments describe; :class:`ConfigError` for missing or invalid ones."""
    if not args.bucket:
        raise ConfigError("--bucket is required (or set FEDBUCKET_BUCKET)")
    if not args.client_id:
        raise ConfigError("--client-id is required (or set FEDBUCKET_CLIENT_ID)")
    try:
        check_identifier(args.client_id, "client id")
    except InvalidIdentifier as exc:
        raise ConfigError(f"--client-id: {exc.reason}") from None
    store = open_store(args.bucket, credentials=args.credentials, retry_timeout=args.timeout)
    return Client(args.bucket, args.client_id, cache_dir=args.cache_dir, store=store)


def cmd_status(args: argparse.Namespace) -> int:
    """Show the current round, its deadline and what this client has submitted (exit 3: no open round)."""
    with open_client(args) as client:
        pointer, _ = read_optional(client.store, client.layout.current_model, ModelPointer)
        task = client.current_round()
        status: dict[str, object] = {
            "bucket": client.store.url,
            "client_id": client.client_id,
            "current_model": pointer.version if pointer else None,
            "privacy": _model_privacy(client, pointer),
            "round": None,
        }
        if task is not None:
            submitted = client.submitted(task.round_id)
            status["round"] = {
                "round_id": task.round_id,
                "base_model_version": task.base_model_version,
                "deadline": task.deadline.isoformat(),
                "seconds_left": round((task.deadline - utcnow()).total_seconds()),
                "training": task.training.model_dump(),
                "submitted": None
                if submitted is None
                else {"sha256": submitted.sha256, "num_examples": submitted.num_examples},
                "secure_aggregation": task.secure_aggregation.model_dump(mode="json")
                if task.secure_aggregation is not None
                else None,
            }
    exit_code = EXIT_OK if status["round"] is not None else EXIT_NO_ROUND  # the same in text and JSON
    if args.json:
        print(json.dumps(status, indent=2))
        return exit_code
    print(f"federation   {status['bucket']}")
    print(f"client       {status['client_id']}")
    print(f"global model {status['current_model'] or '(none yet)'}")
    privacy = status["privacy"]
    if isinstance(privacy, dict):
        guarantee, mechanism = privacy["guarantee"], privacy["mechanism"]
        print(
            f"privacy      differentially private: epsilon <= {guarantee['epsilon_at_most']:g} at delta "
            f"{guarantee['delta']:g} per client (the federation's enforced budget); its round: z="
            f"{mechanism['noise_multiplier']:g}, clip norm {mechanism['clip_norm']:.4g}"
        )
    round_info = status["round"]
    if not isinstance(round_info, dict):
        print("round        no open round")
        return exit_code
    left = round_info["seconds_left"]
    print(f"round        {round_info['round_id']} (base {round_info['base_model_version']})")
    print(f"deadline     {round_info['deadline']} ({'closed' if left < 0 else f'{left} s left'})")
    secure = round_info["secure_aggregation"]
    if isinstance(secure, dict):
        noise = " and adds its share of the DP noise" if secure["noise_stddev"] else ""
        print(
            f"secure       the server sees only the sum: keys by {secure['keys_deadline']}, this client clips to "
            f"{secure['clip_norm']:g}{noise} (fedbucket runs the phases inside submit)"
        )
    sub = round_info["submitted"]
    if sub is None:
        print("submitted    no")
    else:
        print(f"submitted    yes, {sub['num_examples']} examples, sha256 {sub['sha256'][:12]}…")
    return exit_code


def _model_privacy(client: Client, pointer: ModelPointer | None) -> dict | None:
    """The differential-privacy guarantee the current model's manifest carries (None: none). The
    exact epsilon spent is in the server's ledger and reports, which clients cannot read."""
    if pointer is None:
        return None
    manifest, _ = read_document(client.store, client.layout.model_manifest(pointer.version), ModelManifest)
    privacy = manifest.lineage.get("privacy")
    return privacy if isinstance(privacy, dict) else None


def cmd_fetch(args: argparse.Namespace) -> int:
    """Download the current round's base model (or ``--version``), sha256-verified."""
    with open_client(args) as client:
        version = args.version
        if version is None:
            task = client.current_round()
            if task is None:
                raise RoundNotOpen("no open round; pass --version to fetch a specific model")
            version = task.base_model_version
        manifest, _ = read_document(client.store, client.layout.model_manifest(version), ModelManifest)
        update, close = _progress_bar(f"model {version}") if not args.quiet else (None, None)
        try:
            cached = client.fetch_model_file(version, progress=update)
        finally:
            if close:
                close()
    output = Path(args.output or f"model-{version}.safetensors")
    shutil.copyfile(cached, output)
    print(f"model {version} ({manifest.size_bytes} bytes, sha256 verified) -> {output}")
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit trained weights (or a delta) for the open round."""
    metrics = {}
    for item in args.metric:
        key, sep, value = item.partition("=")
        try:
            metrics[key] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise ConfigError(f"--metric {item!r}: use NAME=NUMBER, e.g. --metric loss=0.31")
    if args.num_examples < 1:
        raise ConfigError(f"--num-examples must be at least 1, got {args.num_examples}")
    path = Path(args.file)
    if not path.is_file():
        raise ConfigError(f"{path} is not a file")
    with open_client(args) as client:
        task = client.current_round()
        if task is None:
            raise RoundNotOpen("no open round to submit to (fedbucket status shows when one opens)")
        update, close = _progress_bar("update") if not args.quiet else (None, None)
        try:
            if args.delta:
                manifest = client.submit_file(
                    task, path, num_examples=args.num_examples, metrics=metrics, progress=update
                )
            else:
                manifest = client.submit(
                    task, load_tensors(path), num_examples=args.num_examples, metrics=metrics, progress=update
                )
        finally:
            if close:
                close()
    print(f"submitted update for round {task.round_id}: sha256 {manifest.sha256}, {manifest.num_examples} examples")
    return EXIT_OK
