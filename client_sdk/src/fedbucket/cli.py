"""The ``fedbucket`` command line.

Exit codes (also in ``fedbucket --help``):

    0  success
    1  error (storage, credentials, a corrupted bucket, ...)
    2  bad command-line usage
    3  no open round, or the round is closed / past its deadline / superseded
    4  the update was refused by validation (reason printed)
    5  timed out waiting for a round
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from fedbucket.errors import FedbucketError, RoundNotOpen, StaleUpdate, UpdateRejected

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_ROUND, EXIT_REJECTED, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5

EXIT_CODES = """exit codes:
  0  success
  1  error (storage, credentials, corrupted bucket, ...)
  2  bad command-line usage
  3  no open round, or the round is closed, past its deadline or superseded
  4  the update was refused by validation (the reason is printed)
  5  timed out waiting for a round"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _progress_bar(total: int, description: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)
    return bar.update, bar.close


def _client(args: argparse.Namespace):  # noqa: ANN202 - returns fedbucket.Client (imported lazily)
    from fedbucket.client import Client

    if not args.bucket:
        raise _UsageError("--bucket is required (or set FEDBUCKET_BUCKET)")
    if not args.client_id:
        raise _UsageError("--client-id is required (or set FEDBUCKET_CLIENT_ID)")
    return Client(args.bucket, args.client_id, credentials=args.credentials, cache_dir=args.cache_dir)


class _UsageError(Exception):
    pass


# -- commands ------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from fedbucket.federation import read_optional
    from fedbucket.schemas import ModelPointer, utcnow

    with _client(args) as client:
        pointer, _ = read_optional(client.store, client.layout.current_model, ModelPointer)
        task = client.current_round()
        status: dict[str, object] = {
            "bucket": client.store.url,
            "client_id": client.client_id,
            "current_model": pointer.version if pointer else None,
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
            }
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    print(f"federation   {status['bucket']}")
    print(f"client       {status['client_id']}")
    print(f"global model {status['current_model'] or '(none yet)'}")
    round_info = status["round"]
    if not isinstance(round_info, dict):
        print("round        no open round")
        return EXIT_NO_ROUND
    left = round_info["seconds_left"]
    print(f"round        {round_info['round_id']} (base {round_info['base_model_version']})")
    print(f"deadline     {round_info['deadline']} ({'closed' if left < 0 else f'{left} s left'})")
    sub = round_info["submitted"]
    if sub is None:
        print("submitted    no")
    else:
        print(f"submitted    yes, {sub['num_examples']} examples, sha256 {sub['sha256'][:12]}…")
    return EXIT_OK


def cmd_fetch(args: argparse.Namespace) -> int:
    import shutil

    from fedbucket.federation import read_document
    from fedbucket.schemas import ModelManifest

    with _client(args) as client:
        version = args.version
        if version is None:
            task = client.current_round()
            if task is None:
                raise RoundNotOpen("no open round; pass --version to fetch a specific model")
            version = task.base_model_version
        manifest, _ = read_document(client.store, client.layout.model_manifest(version), ModelManifest)
        update, close = _progress_bar(manifest.size_bytes, f"model {version}") if not args.quiet else (None, None)
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
    from fedbucket.tensors import load_tensors

    metrics = {}
    for item in args.metric:
        key, sep, value = item.partition("=")
        try:
            metrics[key] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise _UsageError(f"--metric {item!r}: use NAME=NUMBER, e.g. --metric loss=0.31")
    path = Path(args.file)
    if not path.is_file():
        raise _UsageError(f"{path} is not a file")
    with _client(args) as client:
        task = client.current_round()
        if task is None:
            raise RoundNotOpen("no open round to submit to (fedbucket status shows when one opens)")
        update, close = _progress_bar(path.stat().st_size, "upload") if not args.quiet else (None, None)
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


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedbucket.simulation import SimulationConfig, simulate

    if args.clients < 1 or args.rounds < 1 or args.alpha <= 0 or not 0 <= args.dropout <= 1:
        raise _UsageError("need --clients >= 1, --rounds >= 1, --alpha > 0 and 0 <= --dropout <= 1")
    if not args.bucket:
        raise _UsageError("--bucket is required (or set FEDBUCKET_BUCKET)")
    config = SimulationConfig(
        bucket_url=args.bucket,
        clients=args.clients,
        rounds=args.rounds,
        partition=args.partition,
        alpha=args.alpha,
        seed=args.seed,
        dropout=args.dropout,
        stragglers=args.stragglers,
        hostile=args.hostile,
        poll_interval=args.poll_interval,
        round_timeout=args.round_timeout,
        cache_dir=args.cache_dir,
    )
    try:
        summary = simulate(config)
    except ValueError as exc:  # impossible roles or partitions (e.g. more clients than examples)
        raise _UsageError(str(exc)) from None
    return EXIT_OK if summary.counts().get("error", 0) == 0 else EXIT_ERROR


def cmd_init(args: argparse.Namespace) -> int:
    from fedbucket.config import FederationConfig
    from fedbucket.federation import init_federation
    from fedbucket.storage import open_store
    from fedbucket.tensors import load_tensors

    config = FederationConfig.load(args.config)
    bucket = args.bucket or config.bucket
    holdout = load_tensors(args.holdout) if args.holdout else None
    if holdout is not None and set(holdout) != {"x", "y"}:
        raise _UsageError(f"--holdout {args.holdout} must hold exactly two tensors, x and y")
    manifest, created = init_federation(open_store(bucket), config, holdout=holdout)
    if created:
        print(f"initialised {bucket}: model {manifest.version} ({config.model.name}, {manifest.size_bytes} bytes)")
        print("wrote the hold-out split; no round is open yet")
    else:
        print(f"{bucket} is already initialised (current model {manifest.version}); nothing changed")
    return EXIT_OK


# -- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedbucket",
        description="Take part in a fedbucket federation: see the current round, fetch the global model, "
        "submit your update, or simulate a federation of clients.",
        epilog=textwrap.dedent(
            """\
            examples:
              export FEDBUCKET_BUCKET=gs://acme-federation/prod FEDBUCKET_CLIENT_ID=hospital-a
              fedbucket status
              fedbucket fetch -o global.safetensors
              fedbucket submit trained.safetensors --num-examples 1342 --metric loss=0.21
              fedbucket simulate --bucket file:///tmp/fed --clients 10 --rounds 3

            """
        )
        + EXIT_CODES,
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(p: argparse.ArgumentParser, *, client: bool = True) -> None:
        p.add_argument(
            "--bucket",
            default=os.environ.get("FEDBUCKET_BUCKET"),
            help="federation URL (gs://… or file://…); env FEDBUCKET_BUCKET",
        )
        if client:
            p.add_argument(
                "--client-id",
                default=os.environ.get("FEDBUCKET_CLIENT_ID"),
                help="your client id; env FEDBUCKET_CLIENT_ID",
            )
            p.add_argument(
                "--credentials",
                default=os.environ.get("FEDBUCKET_CREDENTIALS"),
                help="service-account key file for gs:// (default: Application Default Credentials)",
            )
        p.add_argument("--cache-dir", default=None, help="model cache (default ~/.cache/fedbucket or $FEDBUCKET_CACHE)")

    def add(name: str, help_text: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example:\n  {example}\n\n{EXIT_CODES}",
            formatter_class=_Formatter,
        )
        return p

    p = add(
        "status",
        "Show the current round, its deadline and what this client has submitted.",
        "fedbucket status --bucket gs://acme-federation/prod --client-id hospital-a",
    )
    common(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_status)

    p = add(
        "fetch",
        "Download the current round's base model (or --version) to a safetensors file, sha256-verified.",
        "fedbucket fetch --bucket gs://acme-federation/prod --client-id hospital-a -o global.safetensors",
    )
    common(p)
    p.add_argument("-o", "--output", help="output file (default model-<version>.safetensors)")
    p.add_argument("--version", help="a model version instead of the current round's base")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fetch)

    p = add(
        "submit",
        "Submit a trained model (safetensors) for the open round; fedbucket sends the delta against the round's base.",
        "fedbucket submit trained.safetensors --num-examples 1342 --metric loss=0.21",
    )
    common(p)
    p.add_argument("file", help="safetensors file with the trained weights (or the delta, with --delta)")
    p.add_argument("--num-examples", type=int, required=True, help="examples trained on (the FedAvg weight)")
    p.add_argument(
        "--metric", action="append", default=[], metavar="NAME=VALUE", help="a local metric to report (repeatable)"
    )
    p.add_argument("--delta", action="store_true", help="FILE already holds trained-minus-base deltas")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_submit)

    p = add(
        "init",
        "Initialise a federation (server side): initial model from the config, hold-out split, empty rounds.",
        "fedbucket init --config dags/federation.toml",
    )
    p.add_argument("--config", required=True, help="federation config (TOML)")
    p.add_argument("--bucket", default=None, help="override the config's bucket URL")
    p.add_argument("--holdout", help="safetensors file with x (features) and y (labels); default: digits hold-out")
    p.set_defaults(func=cmd_init)

    p = add(
        "simulate",
        "Run N simulated clients (separate processes) that train on digits for real and submit each round.",
        "fedbucket simulate --bucket file:///tmp/fed --clients 10 --partition dirichlet --alpha 0.5 \\\n"
        "      --dropout 0.1 --stragglers 1 --hostile 1 --rounds 5",
    )
    common(p, client=False)
    p.add_argument("--clients", type=int, default=10, help="number of client processes")
    p.add_argument("--rounds", type=int, default=1, help="rounds each client takes part in before exiting")
    p.add_argument(
        "--partition", choices=["iid", "dirichlet"], default="dirichlet", help="how digits are split among clients"
    )
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller = more non-IID)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the clients")
    p.add_argument(
        "--dropout", type=float, default=0.0, help="fraction of clients that fetch the model but never answer"
    )
    p.add_argument("--stragglers", type=int, default=0, help="clients that submit after the deadline")
    p.add_argument("--hostile", type=int, default=0, help="clients that send malformed or poisoned updates")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between looks at the round pointer")
    p.add_argument(
        "--round-timeout", type=float, default=600.0, help="seconds a client waits for the next round before giving up"
    )
    p.set_defaults(func=cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except _UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"fedbucket {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RoundNotOpen, StaleUpdate) as exc:
        print(f"fedbucket {args.command}: {exc}", file=sys.stderr)
        return EXIT_NO_ROUND
    except UpdateRejected as exc:
        print(f"fedbucket {args.command}: update refused — {exc.code}: {exc.reason}", file=sys.stderr)
        return EXIT_REJECTED
    except TimeoutError as exc:
        print(f"fedbucket {args.command}: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except FedbucketError as exc:
        print(f"fedbucket {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
