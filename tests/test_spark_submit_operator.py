"""LocalSparkSubmitOperator's class-data-sharing archive, with a stand-in spark-submit that writes
the file the JVM would write at exit: the first successful job makes it, later jobs map it, a
failed job leaves nothing half-written behind."""

from __future__ import annotations

from pathlib import Path

import pytest

STAND_IN = """#!/usr/bin/env bash
# records its arguments; "writes the archive at exit" like -XX:ArchiveClassesAtExit would
echo "$@" >> {calls}
for arg in "$@"; do
  case "$arg" in -XX:ArchiveClassesAtExit=*) echo archive > "${{arg#-XX:ArchiveClassesAtExit=}}";; esac
done
exit "$(cat {exit_code})"
"""


@pytest.fixture
def stand_in(tmp_path: Path) -> tuple[Path, Path, Path]:
    calls, exit_code = tmp_path / "calls", tmp_path / "exit-code"
    script = tmp_path / "spark-submit"
    script.write_text(STAND_IN.format(calls=calls, exit_code=exit_code))
    script.chmod(0o755)
    return script, calls, exit_code


def test_the_first_successful_job_writes_the_archive_and_later_jobs_map_it(airflow_home, stand_in, tmp_path):
    from airflow.sdk.exceptions import AirflowException

    from fedbucket_airflow.operators import LocalSparkSubmitOperator

    script, calls, exit_code = stand_in
    cache = tmp_path / "cds"
    operator = LocalSparkSubmitOperator(
        task_id="job", application="job.py", application_args=["--x", "1"], spark_submit=str(script),
        class_data_cache=str(cache),
    )  # fmt: skip
    exit_code.write_text("1")
    with pytest.raises(AirflowException):
        operator.execute({})
    assert not cache.exists() or not any(cache.iterdir())  # a failed job leaves no archive, not even a partial one
    exit_code.write_text("0")
    operator.execute({})
    (archive,) = cache.iterdir()
    assert archive.name.startswith("spark-") and archive.suffix == ".jsa"
    operator.execute({})
    first, second, third = calls.read_text().splitlines()
    assert "-XX:ArchiveClassesAtExit=" in first and "-XX:ArchiveClassesAtExit=" in second
    assert f"-XX:SharedArchiveFile={archive}" in third and third.endswith("job.py --x 1")
    assert list(cache.iterdir()) == [archive]


def test_no_cache_no_options(airflow_home, stand_in):
    from fedbucket_airflow.operators import LocalSparkSubmitOperator

    script, calls, exit_code = stand_in
    exit_code.write_text("0")
    LocalSparkSubmitOperator(
        task_id="job", application="job.py", application_args=[], spark_submit=str(script)
    ).execute({})
    assert "-XX:" not in calls.read_text()
