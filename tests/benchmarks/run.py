"""``make bench``: run every benchmark in one go and write docs/benchmarks.md from their JSON.

Figures are medians of repeated runs measured in the same invocation; these 2-core machines are
noisy, so compare ratios within one run rather than absolute seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def render_client(data: dict) -> str:
    o, s = data["sdk_overhead"], data["simulated_round"]
    return "\n".join(
        [
            "## Client SDK",
            "",
            f"A DistilBERT-shaped state dict ({o['parameters']:,} float32 parameters, {o['bytes'] / 1e6:.0f} MB) "
            f"against fake-gcs-server on 127.0.0.1, median of {o['repeats']} repeats:",
            "",
            "| operation | median seconds |",
            "|---|---|",
            f"| raw google-cloud-storage upload + download of the same bytes | {o['median_raw_s']:.2f} |",
            "| SDK `fetch_model` (download, sha256 check, load) + `submit` (delta, local validation, upload, "
            f"manifest) | {o['median_sdk_s']:.2f} |",
            f"| ratio SDK / raw | **{o['ratio_sdk_over_raw']:.2f}** |",
            "",
            f"One round of {s['clients']} simulated clients (separate processes, real PyTorch training, "
            f"{s['local_epochs']} local epochs, Dirichlet(0.5) digits): **{s['seconds_to_all_updates']:.1f} s** from "
            "opening the round to the last committed update, process start and torch import included.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=["client"], help="run one benchmark")
    args = parser.parse_args()
    sections = []
    if args.only in (None, "client"):
        from tests.benchmarks import bench_client

        bench_client.main()
    client_json = DOCS / "benchmarks" / "client.json"
    if client_json.exists():
        sections.append(render_client(json.loads(client_json.read_text())))
    header = [
        "# Benchmarks",
        "",
        f"Written by `make bench` on {datetime.now(UTC):%Y-%m-%d} ({platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}). Raw figures: `docs/benchmarks/*.json`.",
        "",
    ]
    (DOCS / "benchmarks.md").write_text("\n".join(header + sections))
    print(f"wrote {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
