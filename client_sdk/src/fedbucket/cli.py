"""The ``fedbucket`` command line: the entry point that wires the role packages' commands.

Client commands live in :mod:`fedbucket.client.cli`, ``init`` in :mod:`fedbucket.server.cli`,
``simulate`` in :mod:`fedbucket.sim.cli`; each is imported only when it runs, so ``fedbucket
status`` never loads server code. Every error ends as one line on stderr and an exit code:

    0  success
    1  error (storage, credentials, a corrupted bucket, ...)
    2  bad command-line usage or invalid settings
    3  no open round, or the round is closed / past its deadline / superseded
    4  the update was refused by validation (reason printed)
    5  timed out waiting for a round
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import textwrap
from collections.abc import Sequence

from fedbucket import __version__
from fedbucket.protocol.errors import (
    ConfigError,
    FedbucketError,
    InvalidIdentifier,
    RoundNotOpen,
    StaleUpdate,
    UpdateRejected,
    WaitTimeout,
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_ROUND, EXIT_REJECTED, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5

EXIT_CODES = """exit codes:
  0  success
  1  error (storage, credentials, corrupted bucket, ...)
  2  bad command-line usage or invalid settings
  3  no open round, or the round is closed, past its deadline or superseded
  4  the update was refused by validation (the reason is printed)
  5  timed out waiting for a round"""

#: Seconds a storage call keeps retrying a failing endpoint before it gives up (``--timeout``).
DEFAULT_TIMEOUT_SECONDS = 60.0


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; shows a default only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


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
    parser.add_argument("--version", action="version", version=f"fedbucket {__version__}")
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
                help="service-account key file for gs:// (default: Application Default Credentials); "
                "env FEDBUCKET_CREDENTIALS",
            )
        p.add_argument("--cache-dir", default=None, help="model cache (default ~/.cache/fedbucket or $FEDBUCKET_CACHE)")
        if client:
            timeout(p)

    def timeout(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--timeout",
            type=_positive_seconds,
            default=os.environ.get("FEDBUCKET_TIMEOUT", str(DEFAULT_TIMEOUT_SECONDS)),  # a string: argparse checks it
            metavar="SECONDS",
            help="give up on an unreachable bucket after this long (a line per retry meanwhile); env FEDBUCKET_TIMEOUT",
        )

    def task_arguments(p: argparse.ArgumentParser, *, data_required: bool = True) -> None:
        p.add_argument(
            "--task",
            default=os.environ.get("FEDBUCKET_TASK"),
            metavar="MODULE:ATTR",
            help="your task package (default: the built-in digits task); env FEDBUCKET_TASK",
        )
        p.add_argument(
            "--data",
            required=data_required,
            help="what the task's load_data reads (e.g. a CSV)"
            + ("" if data_required else "; default: the task's example data"),
        )

    def add(name: str, command: str, help_text: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example:\n  {example}\n\n{EXIT_CODES}",
            formatter_class=_Formatter,
        )
        p.set_defaults(command_path=command)
        return p

    p = add(
        "status",
        "fedbucket.client.cli:cmd_status",
        "Show the current round, its deadline and what this client has submitted (exit 3: no open round).",
        "fedbucket status --bucket gs://acme-federation/prod --client-id hospital-a",
    )
    common(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text (same exit code)")

    p = add(
        "fetch",
        "fedbucket.client.cli:cmd_fetch",
        "Download the current round's base model (or --version) to a safetensors file, sha256-verified.",
        "fedbucket fetch --bucket gs://acme-federation/prod --client-id hospital-a -o global.safetensors",
    )
    common(p)
    p.add_argument("-o", "--output", help="output file (default model-<version>.safetensors)")
    p.add_argument("--version", help="a model version instead of the current round's base")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = add(
        "submit",
        "fedbucket.client.cli:cmd_submit",
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

    p = add(
        "report",
        "fedbucket.server.cli:cmd_report",
        "Write a report of the federation's rounds (server side): markdown on stdout, or one self-contained HTML "
        "file with the plots inline (the same content as the Airflow Federation page).",
        "fedbucket report --bucket gs://acme-federation/prod --last 10 --html report.html",
    )
    p.add_argument(
        "--bucket",
        default=os.environ.get("FEDBUCKET_BUCKET"),
        help="federation URL (gs://… or file://…); env FEDBUCKET_BUCKET",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--round", dest="round_id", metavar="ID", help="one round")
    which.add_argument("--last", type=int, metavar="N", help="the last N rounds (default: all)")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML file instead of markdown")

    p = add(
        "init",
        "fedbucket.server.cli:cmd_init",
        "Initialise a federation (server side): initial model from the config's task, the server's validation "
        "and test splits if it holds any, empty rounds. Checks everything before writing anything.",
        "fedbucket init --config dags/federation.toml --validation val.safetensors --test test.safetensors",
    )
    p.add_argument("--config", required=True, help="federation config (TOML)")
    p.add_argument("--bucket", default=None, help="override the config's bucket URL")
    p.add_argument(
        "--validation",
        metavar="FILE",
        help="safetensors file with x and y (int64 labels): the split that gates promotion "
        "(default unless gate.source is federated: a share of the task's example data, e.g. digits)",
    )
    p.add_argument("--test", metavar="FILE", help="safetensors file with x and y: reported only, never gated on")
    p.add_argument(
        "--no-splits", action="store_true", help="publish no server splits (the gate must use federated evaluation)"
    )
    timeout(p)

    p = add(
        "participate",
        "fedbucket.torch.participate:cmd_participate",
        "Take part in rounds until stopped (Ctrl-C): wait, fetch, train with your task, submit; score candidates "
        "on your validation data when the server asks.",
        "fedbucket participate --task fedbucket_textclf.task:TASK --data messages.csv --rounds 0",
    )
    common(p)
    task_arguments(p)
    p.add_argument(
        "--validation-fraction",
        type=float,
        default=0.2,
        help="share of --data kept back to score candidates (0: never evaluate)",
    )
    p.add_argument("--rounds", type=int, default=0, help="stop after training this many rounds (0: run until stopped)")
    p.add_argument("--poll-interval", type=_positive_seconds, default=5.0, help="seconds between looks at the bucket")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split and local shuffling")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line while waiting")
    dp = p.add_argument_group(
        "local differential privacy (DP-SGD through Opacus, pip install 'fedbucket[dp]'; docs/privacy.md)"
    )
    dp.add_argument("--dp-sgd-noise", type=float, default=None, help="noise multiplier: train with DP-SGD")
    dp.add_argument("--dp-sgd-clip", type=float, default=1.0, help="per-example gradient clip norm (default 1.0)")
    dp.add_argument(
        "--dp-sgd-epsilon", type=float, default=None, help="local epsilon budget: refuse rounds that would pass it"
    )
    dp.add_argument("--dp-sgd-delta", type=float, default=1e-5, help="delta of the local guarantee (default 1e-5)")
    dp.add_argument(
        "--dp-sgd-state",
        default=None,
        help="where the local accountant's history is kept (default: dp-sgd-<client>.json in the cache directory)",
    )

    p = add(
        "simulate",
        "fedbucket.sim.cli:cmd_simulate",
        "Run N simulated clients (separate processes) that train for real and submit each round: the built-in "
        "digits task, or your own task package on its example data or --data.",
        "fedbucket simulate --bucket file:///tmp/fed --clients 10 --partition dirichlet --alpha 0.5 \\\n"
        "      --dropout 0.1 --stragglers 1 --hostile 1 --rounds 5 [--task pkg.module:TASK --data file]",
    )
    common(p, client=False)
    task_arguments(p, data_required=False)
    p.add_argument("--clients", type=int, default=10, help="number of client processes")
    p.add_argument("--rounds", type=int, default=1, help="rounds each client takes part in before exiting")
    p.add_argument(
        "--partition", choices=["iid", "dirichlet"], default="dirichlet", help="how digits are split among clients"
    )
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller = more non-IID)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the clients (match the config's seed)")
    p.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.2,
        help="share of the task's example data left out for the server's splits, as `fedbucket init` does "
        "(match the config's holdout_fraction; ignored with --data)",
    )
    p.add_argument(
        "--dropout", type=float, default=0.0, help="fraction of clients that fetch the model but never answer"
    )
    p.add_argument("--stragglers", type=int, default=0, help="clients that submit after the deadline")
    p.add_argument("--hostile", type=int, default=0, help="clients that send malformed or poisoned updates")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between looks at the round pointer")
    p.add_argument(
        "--round-timeout", type=float, default=600.0, help="seconds a client waits for the next round before giving up"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Storage retries log one warning line each (logger fedbucket.protocol.storage); nothing else is noisy.
    logging.basicConfig(level=logging.WARNING, format="fedbucket: %(message)s", stream=sys.stderr)
    module_name, _, function = args.command_path.partition(":")
    prefix = f"fedbucket {args.command}"
    try:
        command = getattr(importlib.import_module(module_name), function)
        return int(command(args))
    except (ConfigError, InvalidIdentifier) as exc:  # one line, like every other error
        print(f"{prefix}: error: {exc} (see fedbucket {args.command} --help)", file=sys.stderr)
        return EXIT_USAGE
    except (RoundNotOpen, StaleUpdate) as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        return EXIT_NO_ROUND
    except UpdateRejected as exc:
        print(f"{prefix}: update refused — {exc.code}: {exc.reason}", file=sys.stderr)
        return EXIT_REJECTED
    except WaitTimeout as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except FedbucketError as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # local files: unreadable input, unwritable output, full disk
        print(f"{prefix}: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR
    except ImportError as exc:  # an extra that is not installed (torch, scikit-learn)
        print(f"{prefix}: {exc}; install the extra it needs (pip install 'fedbucket[simulate]')", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
