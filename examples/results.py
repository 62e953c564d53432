"""Learning quality on digits: ``make results`` writes docs/results.md (keeping the text example's
section, which examples/text_results.py writes).

Runs the demo federation with 10 honest clients on Dirichlet(0.5) non-IID digits for 20 rounds of
the real DAG (FedAvg), then trains the same MLP centrally on the union of the clients' data with
the same optimiser settings, and compares both on the same held-out split.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def centralised(epochs: int, seed: int = 0) -> list[float]:
    """Held-out accuracy after each epoch of central training on all training data."""
    from fedbucket.protocol.documents import ModelSpec, TrainingConfig
    from fedbucket.torch.task import build_model, example_split, load_task
    from fedbucket.torch.training import evaluate, train_local

    # The same split the demo's `fedbucket init` and `fedbucket simulate` make: the clients' pool
    # to train on, and the server's validation split the federation's accuracy is measured on.
    train, holdout, _ = example_split(load_task(None), seed=seed, holdout_fraction=0.2)
    model = build_model(ModelSpec(name="mlp", kwargs={"hidden": 64}), seed=seed)
    training = TrainingConfig(local_epochs=1, batch_size=16, learning_rate=0.05)
    scores = []
    for epoch in range(epochs):
        train_local(model, train, training, seed=epoch)
        scores.append(evaluate(model, holdout)["accuracy"])
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--target", type=float, default=0.95)
    args = parser.parse_args()
    out = REPO / "results-output"
    demo = [
        sys.executable, str(REPO / "examples" / "demo.py"), "--rounds", str(args.rounds), "--clean-clients",
        "--deadline", "120", "--out", str(out),
    ]  # fmt: skip
    subprocess.run(demo, check=True)
    rows = json.loads((out / "rounds.json").read_text())
    central = centralised(epochs=2 * args.rounds)  # 2 local epochs per round in the federation
    reached = next((i + 1 for i, r in enumerate(rows) if (r["accuracy"] or 0) >= args.target and r["promoted"]), None)
    central_reached = next((i + 1 for i, a in enumerate(central) if a >= args.target), None)
    shutil.copyfile(out / "metrics.png", DOCS / "results.png")
    if reached:
        federated_outcome = f"reached {args.target} held-out accuracy in round {reached}"
    else:
        federated_outcome = f"did not reach {args.target} in {len(rows)} rounds"
    lines = [
        "# Learning quality on digits",
        "",
        "Measured with `make results` (`examples/results.py`): 10 simulated clients (separate processes, PyTorch),",
        "scikit-learn's 8x8 digits split 80/20 into the clients' data and a held-out share (halved into the server's",
        "validation split, on which the accuracy below is measured and the gate compares, and a test split);",
        "the clients' part dealt to the clients by a Dirichlet(0.5) label split (non-IID, seed 0); an MLP with",
        "64 hidden units; each round every",
        "client trains 2 local epochs (SGD, momentum 0.9, lr 0.05, batch 16) and the DAG aggregates with FedAvg,",
        "evaluates on the validation split with Spark and promotes through the gate (accuracy, tolerance 0.1).",
        "",
        f"- Federated (the DAG): **{federated_outcome}**; "
        f"best held-out accuracy {max((r['accuracy'] or 0) for r in rows):.3f}.",
        f"- Centralised, same model and optimiser on the union of the data: {central[-1]:.3f} after "
        f"{len(central)} epochs (the federation's total local epochs per client); reached {args.target} after "
        f"{central_reached if central_reached else 'more than ' + str(len(central))} epoch(s).",
        "",
        "| round | status | accepted | held-out accuracy | macro-F1 | promoted |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        f1 = "-" if r["macro_f1"] is None else f"{r['macro_f1']:.3f}"
        lines.append(
            f"| {r['round']} | {r['status']} | {r['accepted']} | {acc} | {f1} | {'yes' if r['promoted'] else 'no'} |"
        )
    lines += [
        "",
        "![held-out accuracy and macro-F1 per round](results.png)",
        "",
        "Centralised accuracy per epoch: " + ", ".join(f"{a:.3f}" for a in central),
        "",
    ]
    previous = (DOCS / "results.md").read_text() if (DOCS / "results.md").exists() else ""
    text_section = previous[previous.find("<!-- text-results") :] if "<!-- text-results" in previous else ""
    (DOCS / "results.md").write_text("\n".join(lines) + ("\n" + text_section if text_section else ""))  # keep it
    print(f"wrote {DOCS / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
