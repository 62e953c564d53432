"""The CLI's error contract, run as a user runs it (a subprocess): one line per error whatever
happens, exit codes that agree between text and JSON, a bounded wait on an unreachable bucket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedbucket import __version__
from fedbucket.cli import EXIT_ERROR, EXIT_NO_ROUND, EXIT_OK, EXIT_USAGE, main
from fedbucket.server.rounds import close_round

FEDBUCKET = str(Path(sys.executable).parent / "fedbucket")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FEDBUCKET, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


def test_unreachable_bucket_says_so_while_retrying_and_gives_up_in_time():
    endpoint = f"http://127.0.0.1:{closed_port()}"
    run = run_cli(
        "status", "--bucket", "gs://federation/prod", "--client-id", "hospital-a", "--timeout", "3",
        env={"STORAGE_EMULATOR_HOST": endpoint},
    )  # fmt: skip
    assert run.returncode == EXIT_ERROR
    lines = run.stderr.strip().splitlines()
    assert "Traceback" not in run.stderr
    retries = lines[:-1]  # a line per retry, then one line of error: nothing else
    assert retries and all(
        line == "fedbucket: gs://federation/prod: Connection refused; retrying (limit 3 s)" for line in retries
    )
    assert lines[-1] == (
        "fedbucket status: gs://federation/prod unreachable: gave up retrying (limit 3 s): Connection refused"
    )


def test_a_mistyped_file_url_is_an_error_and_creates_nothing(tmp_path):
    typo = tmp_path / "federation-typo"
    run = run_cli("status", "--bucket", typo.as_uri(), "--client-id", "hospital-a")
    assert run.returncode == EXIT_ERROR
    assert run.stderr.strip().count("\n") == 0 and "does not exist" in run.stderr
    assert not typo.exists()


def test_invalid_client_id_is_a_usage_error(store_url, open_task, capsys):
    assert main(["status", "--bucket", store_url, "--client-id", "../other"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "client id" in err and "Traceback" not in err


def test_status_exit_codes_agree_between_text_and_json(store, store_url, open_task, capsys, tmp_path):
    common = ["--bucket", store_url, "--client-id", "hospital-a", "--cache-dir", str(tmp_path)]
    assert main(["status", *common]) == EXIT_OK
    assert main(["status", "--json", *common]) == EXIT_OK
    capsys.readouterr()
    close_round(store, open_task.round_id)
    assert main(["status", *common]) == EXIT_NO_ROUND
    assert main(["status", "--json", *common]) == EXIT_NO_ROUND
    assert json.loads(capsys.readouterr().out.split("round        no open round\n")[-1])["round"] is None


def test_version_and_help_without_noise():
    run = run_cli("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"fedbucket {__version__}"
    for command in ("status", "fetch", "submit", "init", "simulate"):
        text = run_cli(command, "--help").stdout
        assert "(default: None)" not in text and "(default: False)" not in text, command
        assert "exit codes" in text
    assert "(default: 10)" in run_cli("simulate", "--help").stdout  # real defaults are still shown


@pytest.mark.parametrize("store_url", ["file"], indirect=True)
def test_an_unreadable_local_file_is_one_line(store_url, open_task, tmp_path):
    run = run_cli(
        "submit", str(tmp_path / "missing.safetensors"), "--num-examples", "3",
        "--bucket", store_url, "--client-id", "hospital-a",
    )  # fmt: skip
    assert run.returncode == EXIT_USAGE and len(run.stderr.strip().splitlines()) == 1
    assert "is not a file" in run.stderr
    assert "Traceback" not in run.stderr


def test_client_commands_use_the_cli_exit_codes():
    from fedbucket import cli
    from fedbucket.client import cli as client_cli

    assert (client_cli.EXIT_OK, client_cli.EXIT_NO_ROUND) == (cli.EXIT_OK, cli.EXIT_NO_ROUND)


@pytest.mark.parametrize("store_url", ["file"], indirect=True)
def test_status_says_when_the_round_is_secure(store, store_url, capsys, tmp_path):
    from conftest import TINY_SPEC, tiny_model
    from fedbucket.protocol.documents import TrainingConfig, utcnow
    from fedbucket.server.config import SecureAggregationSettings
    from fedbucket.server.rounds import open_round, publish_model, set_current_model

    manifest = publish_model(store, tiny_model(), version="init", model=TINY_SPEC)
    set_current_model(store, manifest, expected_generation=0)
    secure = SecureAggregationSettings(enabled=True, clip_norm=2.0)
    open_round(store, round_id="r1", opened_at=utcnow(), deadline_seconds=60, training=TrainingConfig(),
               min_clients=3, max_clients=5, secure_aggregation=secure)  # fmt: skip
    common = ["--bucket", store_url, "--client-id", "hospital-a", "--cache-dir", str(tmp_path)]
    assert main(["status", *common]) == EXIT_OK
    assert "secure       the server sees only the sum" in capsys.readouterr().out
    assert main(["status", "--json", *common]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["round"]["secure_aggregation"]["clip_norm"] == 2.0
