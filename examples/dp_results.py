"""What differential privacy costs: ``make results`` writes the "Differential privacy" section of
docs/results.md and docs/results-dp.png.

**Central DP (DP-FedAvg with adaptive clipping) at 1,000 clients.** Digits has 1,797 images, too
few for 1,000 clients, so each client gets its own *augmented* sample: 64 images drawn from the
80% training pool (the other 20% is the held-out test set, never augmented), each shifted by up to
one pixel in x and y, its intensity scaled by U(0.8, 1.2), plus N(0, 0.05) pixel noise, clipped to
[0, 1]. Every round a seeded draw picks ``--per-round`` clients among those still under the
participation cap (clients choose when they take part; the draw is the simulation's, not a secret
of the server). The clients are :class:`~fedbucket.torch.participate.Participant` objects on a
``file://`` bucket (SDK fetch, local SGD, delta submit); the server steps are the functions the
DAG calls (open, freeze, aggregation with the serial engine, evaluation on the test split,
promotion). The private run and the non-private run (FedAvg, example-weighted, no clipping) see
the same clients in the same rounds. Epsilon per round is the accountant's, from the round reports.

**Local DP-SGD on one client.** The whole training pool as one client, 5 rounds of 2 epochs of
DP-SGD (Opacus, clip 1.0, batch 64) at three noise multipliers, against the same training without DP.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results_section import write_section

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
BEGIN, END = "<!-- dp-results: written by examples/dp_results.py -->", "<!-- /dp-results -->"


def augmented(pool, count: int, rng: np.random.Generator):
    """``count`` augmented digits drawn from ``pool`` (see the module doc)."""
    from fedbucket.torch.task import Examples

    pick = rng.integers(0, len(pool), size=count)
    images = pool.x[pick].reshape(count, 8, 8).copy()
    for i in range(count):
        dy, dx = rng.integers(-1, 2, size=2)
        images[i] = np.roll(images[i], (dy, dx), axis=(0, 1))
        if dy:
            images[i, 0 if dy > 0 else -1, :] = 0
        if dx:
            images[i, :, 0 if dx > 0 else -1] = 0
    images *= rng.uniform(0.8, 1.2, size=(count, 1, 1))
    images += rng.normal(0, 0.05, size=images.shape)
    return Examples(np.clip(images, 0, 1).reshape(count, 64).astype(np.float32), pool.y[pick].copy())


def federated_run(private: bool, args: argparse.Namespace) -> list[dict]:
    from fedbucket.client import Client
    from fedbucket.protocol.documents import EvaluationReport, read_document, utcnow
    from fedbucket.protocol.layout import LAYOUT
    from fedbucket.protocol.storage import open_store
    from fedbucket.server.aggregation import run_aggregation
    from fedbucket.server.config import FederationConfig, PrivacySettings
    from fedbucket.server.evaluation import run_evaluation
    from fedbucket.server.initialise import init_federation
    from fedbucket.server.promotion import promote_candidate
    from fedbucket.server.rounds import freeze_round, open_round
    from fedbucket.server.strategies import build_strategy
    from fedbucket.torch.digits import TASK
    from fedbucket.torch.participate import Participant
    from fedbucket.torch.task import example_split

    pool, validation, test = example_split(TASK, seed=args.seed, holdout_fraction=0.2)
    held_out = type(test)(np.concatenate([validation.x, test.x]), np.concatenate([validation.y, test.y]))
    privacy = PrivacySettings(
        dp=private,
        noise_multiplier=args.noise_multiplier,
        clip_norm=args.clip_norm,
        target_quantile=0.5,
        expected_clients=args.per_round,
        max_participations=args.cap,
        epsilon_budget=args.budget,
    )
    noise_key = secrets.token_bytes(32)  # the server's secret for this run; never stored
    rows: list[dict] = []
    data_rng = np.random.default_rng(args.seed)  # the same clients' data in both runs
    choice_rng = np.random.default_rng(args.seed + 1)  # the same clients in the same rounds
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(tmp, "bucket").as_uri(), create=True)
        config = FederationConfig(
            bucket=store.url,
            model={"name": "mlp", "kwargs": {"hidden": args.hidden}},
            seed=args.seed,
            training={"local_epochs": args.local_epochs, "batch_size": 16, "learning_rate": args.learning_rate},
            privacy=privacy,
        )
        init_federation(store, config, validation=validation, test=test)
        participants = []
        for number in range(args.clients):
            client = Client(store.url, f"c{number:04d}", cache_dir=Path(tmp, "cache"), store=store)
            local = augmented(pool, args.examples, data_rng)
            participants.append(Participant(client, TASK, None, local, seed=number, echo=lambda s: None))
        taken = np.zeros(args.clients, dtype=int)
        strategy = build_strategy("fedavg")
        for number in range(1, args.rounds + 1):
            started = time.perf_counter()
            round_id = f"{'dp' if private else 'plain'}-{number:03d}"
            eligible = np.flatnonzero(taken < args.cap)
            if len(eligible) < args.per_round:
                print(f"round {number}: only {len(eligible)} clients under the cap; stopping", flush=True)
                break
            chosen = choice_rng.choice(eligible, size=args.per_round, replace=False)
            taken[chosen] += 1
            task = open_round(
                store, round_id=round_id, opened_at=utcnow(), deadline_seconds=3600, training=config.training,
                min_clients=args.per_round,
            )  # fmt: skip
            for index in chosen:
                participants[index].train_round(task)
            freeze_round(store, task, reason="max_clients", closed_at=utcnow())
            report = run_aggregation(
                store, round_id, strategy, privacy=privacy if private else None, noise_key=noise_key
            )
            run_evaluation(store, round_id)
            evaluation, _ = read_document(store, LAYOUT.evaluation_report(round_id), EvaluationReport)
            promote_candidate(store, round_id)  # no gate: the trajectory itself is what is measured
            assert evaluation.test is not None and evaluation.validation is not None
            correct = evaluation.test.accuracy * len(test) + evaluation.validation.candidate.accuracy * len(validation)
            row = {
                "round": number,
                "test_accuracy": correct / len(held_out),  # both server splits: 20% of digits, never augmented
                "accepted": sum(1 for u in report.updates if u.accepted),
                "seconds": time.perf_counter() - started,
            }
            if report.privacy is not None:
                row |= {
                    "epsilon": report.privacy.spent.epsilon,
                    "clip_norm": report.privacy.mechanism.clip_norm,
                    "noise_stddev": report.privacy.mechanism.noise_stddev,
                    "unclipped_fraction": report.privacy.mechanism.unclipped_fraction,
                }
            rows.append(row)
            print(f"{'dp' if private else 'plain'} {json.dumps(row)}", flush=True)
    return rows


def dp_sgd_runs(args: argparse.Namespace) -> list[dict]:
    from fedbucket.protocol.documents import ModelSpec, TrainingConfig
    from fedbucket.torch.digits import TASK
    from fedbucket.torch.dp_sgd import DPSGDSettings, LocalPrivacy
    from fedbucket.torch.task import example_split
    from fedbucket.torch.training import evaluate

    pool, validation, test = example_split(TASK, seed=args.seed, holdout_fraction=0.2)
    held_out = type(test)(np.concatenate([validation.x, test.x]), np.concatenate([validation.y, test.y]))
    training = TrainingConfig(local_epochs=2, batch_size=64, learning_rate=0.1)
    spec = ModelSpec(name="mlp", kwargs={"hidden": args.hidden})
    rows = []
    for noise in (None, *args.dp_sgd_noise):
        model = TASK.build_model(spec, seed=args.seed)
        if noise is None:
            for round_number in range(5):
                TASK.fit(model, pool, training, seed=round_number)
            epsilon = None
        else:
            local = LocalPrivacy(DPSGDSettings(noise, 1.0, epsilon_budget=1e9))
            for _ in range(5):
                local.fit(model, pool, training)
            epsilon = local.epsilon
        accuracy = evaluate(model, held_out)["accuracy"]
        rows.append({"noise_multiplier": noise, "epsilon": epsilon, "test_accuracy": accuracy})
        print(f"dp-sgd {json.dumps(rows[-1])}", flush=True)
    return rows


def plot(plain: list[dict], private: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot([r["round"] for r in plain], [r["test_accuracy"] for r in plain], "-", label="FedAvg, no DP")
    left.plot([r["round"] for r in private], [r["test_accuracy"] for r in private], "-", label="DP-FedAvg")
    left.set_xlabel("round")
    left.set_ylabel("held-out accuracy")
    left.set_title(f"{args.clients} clients, {args.per_round} per round, z={args.noise_multiplier:g}")
    left.legend()
    right.plot([r["round"] for r in private], [r["epsilon"] for r in private], "-", color="C3", label="epsilon")
    right.set_xlabel("round")
    right.set_ylabel("epsilon at delta 1e-5 (worst client)", color="C3")
    clip = right.twinx()
    clip.plot([r["round"] for r in private], [r["clip_norm"] for r in private], ":", color="C2")
    clip.set_ylabel("adaptive clip norm C", color="C2")
    right.set_title("privacy spent and the clip norm")
    fig.tight_layout()
    fig.savefig(DOCS / "results-dp.png", dpi=110)


def _or(value: float | None, missing: str, form: str) -> str:
    return missing if value is None else form.format(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000, help="population size")
    parser.add_argument("--per-round", type=int, default=200, help="clients per round (n-bar)")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--cap", type=int, default=5, help="participation cap per client")
    parser.add_argument("--examples", type=int, default=64, help="augmented examples per client")
    parser.add_argument("--hidden", type=int, default=32, help="hidden units of the MLP")
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--noise-multiplier", type=float, default=1.5)
    parser.add_argument("--clip-norm", type=float, default=1.0, help="initial clip norm (adaptive)")
    parser.add_argument("--budget", type=float, default=8.0)
    parser.add_argument("--dp-sgd-noise", type=float, nargs="+", default=[0.6, 1.0, 2.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    plain = federated_run(False, args)
    private = federated_run(True, args)
    local = dp_sgd_runs(args)
    seconds = time.perf_counter() - started
    plot(plain, private, args)

    final_plain, final_private = plain[-1]["test_accuracy"], private[-1]["test_accuracy"]
    gap = 100 * (final_plain - final_private)
    table = "\n".join(
        f"| {r['round']} | {p['test_accuracy']:.3f} | {r['test_accuracy']:.3f} | {r['epsilon']:.2f} | "
        f"{r['clip_norm']:.3f} | {r['unclipped_fraction']:.2f} |"
        for p, r in zip(plain, private, strict=False)
        if r["round"] in {1, 2, 5, 10, 15, 20, 25, 30, 40, 50} or r is private[-1]
    )
    sgd = "\n".join(
        f"| {_or(r['noise_multiplier'], 'none (SGD)', '{:g}')} | {_or(r['epsilon'], 'no guarantee', '{:.2f}')} | "
        f"{r['test_accuracy']:.3f} |"
        for r in local
    )
    met = private[-1]["epsilon"] <= args.budget and gap <= 5
    target = "met" if met else "not met"
    text = f"""## Differential privacy

Measured by `make results` (`examples/dp_results.py`, {seconds / 60:.0f} minutes on this machine); the
plot is `docs/results-dp.png`. How the data is made and who takes part: the script's docstring.

![accuracy and epsilon per round](results-dp.png)

**Central DP at {args.clients:,} clients** ({args.per_round} per round, participation cap {args.cap},
noise multiplier z = {args.noise_multiplier:g}, adaptive clipping to the median norm from C = {args.clip_norm:g},
an MLP with {args.hidden} hidden units on augmented digits): after {private[-1]["round"]} rounds the
private model reaches **{final_private:.3f}** held-out accuracy against **{final_plain:.3f}** without DP
({gap:.1f} points lower), at **epsilon = {private[-1]["epsilon"]:.2f} at delta = 1e-5** for the worst client
(no amplification claimed: each client's epsilon composes the rounds it took part in, at most {args.cap}).
Target (epsilon <= 8 within 5 points of non-private): **{target}**.

| round | accuracy, no DP | accuracy, DP-FedAvg | epsilon (worst client) | clip norm C | noisy unclipped share |
|---:|---:|---:|---:|---:|---:|
{table}

**Local DP-SGD on one client** (the whole training pool, {len(local) - 1} noise levels, 5 rounds of 2
epochs, clip 1.0, batch 64; epsilon from Opacus's RDP accountant at delta = 1e-5):

| noise multiplier | epsilon | held-out accuracy |
|---:|---:|---:|
{sgd}
"""
    write_section(BEGIN, END, text)
    (DOCS / "benchmarks").mkdir(exist_ok=True)
    (DOCS / "benchmarks" / "dp_results.json").write_text(
        json.dumps({"args": vars(args), "plain": plain, "private": private, "dp_sgd": local}, indent=1)
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
