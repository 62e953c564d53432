"""Differential privacy: the DP-FedAvg candidate against a hand computation, the noise's statistics,
adaptive clipping from both sides, the accountant against dp-accounting, the budget, the
participation cap, server-side sampling, and byte-identical re-runs (also under spark-submit)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from scipy import stats

from conftest import TINY_SPEC, submit_deltas
from fedbucket import LAYOUT, ModelSpec, ObjectStore, TrainingConfig, tensors_from_bytes, tensors_to_bytes
from fedbucket.client import upload_update
from fedbucket.protocol.documents import AggregationReport, ModelManifest, read_document, utcnow
from fedbucket.protocol.errors import ConfigError, PrivacyBudgetExceeded
from fedbucket.server.aggregation import run_aggregation
from fedbucket.server.config import FederationConfig, PrivacySettings, RunSettings
from fedbucket.server.privacy import (
    RoundNoise,
    adapt_clip_norm,
    charge_round,
    check_budget,
    client_histories,
    epsilon,
    read_ledger,
    round_mechanism,
    worst_case_after,
)
from fedbucket.server.rounds import open_round, publish_model, set_current_model
from fedbucket.server.strategies import build_strategy

TINY_MLP = ModelSpec(name="mlp", kwargs={"hidden": 16})
KEY = bytes(range(32))  # a test key; production keys come from secrets.token_hex(32)
SHAPES = {"w": (40, 30), "b": (30,), "steps": ()}


def base_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "w": rng.standard_normal(SHAPES["w"]).astype(np.float32),
        "b": rng.standard_normal(SHAPES["b"]).astype(np.float32),
        "steps": np.array(5, dtype=np.int64),
    }


def delta_with_norm(seed: int, norm: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w, b = rng.standard_normal(SHAPES["w"]), rng.standard_normal(SHAPES["b"])
    scale = norm / math.sqrt(float(np.sum(w**2) + np.sum(b**2)))
    return {"w": (w * scale).astype(np.float32), "b": (b * scale).astype(np.float32), "steps": np.array(9, np.int64)}


def submit_round(store: ObjectStore, tmp_path: Path, round_id: str, deltas: dict[str, dict]) -> None:
    submit_deltas(store, tmp_path, round_id, base_model(), deltas)


def candidate(store: ObjectStore, round_id: str) -> dict[str, np.ndarray]:
    return tensors_from_bytes(store.get_bytes(LAYOUT.candidate_payload(round_id))[0])


def dp_settings(**changes) -> PrivacySettings:
    return PrivacySettings(dp=True, **changes)


# -- the noise ---------------------------------------------------------------------------------


def test_noise_is_addressed_by_element_and_secret_by_key():
    noise = RoundNoise.derive(KEY, "r1")
    whole = noise.tensor_noise("w", 0, 3000)
    assert np.array_equal(whole[1234:2345], noise.tensor_noise("w", 1234, 2345))  # any slice alone
    assert not np.array_equal(whole, noise.tensor_noise("b", 0, 3000))  # tensors draw different streams
    assert not np.array_equal(whole, RoundNoise.derive(KEY, "r2").tensor_noise("w", 0, 3000))  # rounds too
    assert not np.array_equal(whole, RoundNoise.derive(bytes(32), "r1").tensor_noise("w", 0, 3000))  # and keys
    assert "secret" in repr(noise) and KEY.hex() not in repr(noise)
    boundary = 1 << 20  # draws are made in chunks of 2**20 normals: a slice across the seam is the same
    across = noise.tensor_noise("w", boundary - 7, boundary + 5)
    assert np.array_equal(across, noise.tensor_noise("w", 0, boundary + 5)[-12:])


def test_noise_is_standard_normal():
    draws = RoundNoise.derive(KEY, "stats").tensor_noise("w", 0, 2_000_000)
    n = draws.size
    assert abs(draws.mean()) < 5 / math.sqrt(n)  # five standard errors
    assert abs(draws.std() - 1) < 5 * math.sqrt(0.5 / n)
    assert stats.kstest(draws[:200_000], "norm").pvalue > 1e-4  # the shape, not only two moments
    assert np.isfinite(draws).all()


# -- the mechanism on a real round -------------------------------------------------------------


def test_dp_fedavg_candidate_equals_hand_computation(store, tmp_path):
    norms = {"a": 0.5, "b": 2.0, "c": 8.0}  # one under the clip norm, two over it
    deltas = {c: delta_with_norm(i, n) for i, (c, n) in enumerate(norms.items())}
    submit_round(store, tmp_path, "r1", deltas)
    settings = dp_settings(clip_norm=1.0, noise_multiplier=1.3, expected_clients=4, clipped_count_stddev=2.0)
    report = run_aggregation(store, "r1", build_strategy("fedavg"), privacy=settings, noise_key=KEY)
    assert report.status == "aggregated" and report.privacy is not None

    z_delta = (1.3**-2 - (2 * 2.0) ** -2) ** -0.5  # the noise split of Andrew et al.
    mechanism = report.privacy.mechanism
    assert mechanism.update_noise_multiplier == pytest.approx(z_delta)
    assert mechanism.noise_stddev == pytest.approx(z_delta * 1.0 / 4)
    assert mechanism.denominator == 4 and mechanism.clip_norm == 1.0 and mechanism.charged_clients == 3

    base, out = base_model(), candidate(store, "r1")
    noise = RoundNoise.derive(KEY, "r1")
    for name in ("w", "b"):
        clipped_sum = sum(
            deltas[c][name].astype(np.float64) * min(1.0, 1.0 / norms[c]) for c in sorted(deltas)
        )  # uniform weights: the example counts play no part
        expected = (
            base[name]
            + clipped_sum / 4
            + mechanism.noise_stddev * noise.tensor_noise(name, 0, base[name].size).reshape(base[name].shape)
        )
        np.testing.assert_allclose(out[name], expected.astype(np.float32), rtol=0, atol=2e-6)
    assert out["steps"] == base["steps"]  # integer buffers are not released under DP

    # one update unclipped of three: the noisy share, and C moves the documented way
    share = min(1, max(0, ((1 - 3 / 2) + 2.0 * noise.count_noise()) / 4 + 0.5))
    assert mechanism.unclipped_fraction == pytest.approx(share)
    assert mechanism.next_clip_norm == pytest.approx(1.0 * math.exp(-0.2 * (share - 0.5)))
    manifest, _ = read_document(store, LAYOUT.candidate_manifest("r1"), ModelManifest)
    public = manifest.lineage["privacy"]  # every client reads model manifests: no count, no exact epsilon
    assert public["guarantee"] == {
        "epsilon_at_most": 8.0, "delta": 1e-5, "accountant": "dp-accounting PLD", "max_participations": 10
    }  # fmt: skip
    assert "charged_clients" not in public["mechanism"] and "accepted_count" not in manifest.lineage
    assert public["mechanism"]["noise_stddev"] == pytest.approx(mechanism.noise_stddev)
    assert report.privacy.spent.epsilon == pytest.approx(epsilon(Counter({(1.3, None, "gaussian"): 1}), 1e-5))


def test_noise_on_the_candidate_has_the_stated_std(tmp_path):
    """Zero deltas: the candidate minus the base is the noise alone, std z_delta * C / n-bar."""
    from fedbucket import open_store

    store = open_store((tmp_path / "bucket").as_uri(), create=True)
    rng = np.random.default_rng(3)
    big = {"w": rng.standard_normal((600, 500)).astype(np.float32), "b": np.zeros(30, np.float32)}
    big["steps"] = np.array(1, dtype=np.int64)
    manifest = publish_model(store, big, version="init", model=TINY_SPEC)
    set_current_model(store, manifest, expected_generation=0)
    zero = {"w": np.zeros((600, 500), np.float32), "b": np.zeros(30, np.float32), "steps": np.array(0, np.int64)}
    task = open_round(store, round_id="r1", opened_at=utcnow(), deadline_seconds=60, training=TrainingConfig())
    for client in ("a", "b"):
        path = tmp_path / f"{client}.safetensors"
        path.write_bytes(tensors_to_bytes(zero))
        upload_update(store, task, client, path, num_examples=5)
    settings = dp_settings(clip_norm=0.5, noise_multiplier=0.8, adaptive_clipping=False, expected_clients=10)
    report = run_aggregation(store, "r1", build_strategy("fedavg"), privacy=settings, noise_key=KEY)
    noise = candidate(store, "r1")["w"].astype(np.float64) - big["w"].astype(np.float64)
    expected_std = 0.8 * 0.5 / 10  # fixed clip: z_delta = z
    assert report.privacy.mechanism.noise_stddev == pytest.approx(expected_std)
    assert abs(noise.mean()) < 5 * expected_std / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(expected_std, rel=0.01)


def test_rerun_is_byte_identical_and_charged_once(store, tmp_path):
    deltas = {f"c{i}": delta_with_norm(i, 0.3 + i) for i in range(3)}
    submit_round(store, tmp_path, "r1", deltas)
    settings = dp_settings(clip_norm=1.0, expected_clients=3)
    run_aggregation(store, "r1", build_strategy("fedadam"), privacy=settings, noise_key=KEY, shard_elements=50)
    first = store.get_bytes(LAYOUT.candidate_payload("r1"))[0]
    first_manifest = store.get_bytes(LAYOUT.candidate_manifest("r1"))[0]
    run_aggregation(store, "r1", build_strategy("fedadam"), privacy=settings, noise_key=KEY, shard_elements=777)
    assert store.get_bytes(LAYOUT.candidate_payload("r1"))[0] == first  # other sharding, same bytes
    assert store.get_bytes(LAYOUT.candidate_manifest("r1"))[0] == first_manifest
    ledger, _ = read_ledger(store)
    assert [e.round_id for e in ledger.rounds] == ["r1"] and ledger.rounds[0].clients == ["c0", "c1", "c2"]
    run_aggregation(store, "r1", build_strategy("fedadam"), privacy=settings, noise_key=bytes(32))
    assert store.get_bytes(LAYOUT.candidate_payload("r1"))[0] != first  # the key is what makes the noise


def test_participation_cap_rejects_before_reading(store, tmp_path):
    settings = dp_settings(clip_norm=1.0, expected_clients=2, max_participations=2, epsilon_budget=100)
    for round_id in ("r1", "r2", "r3"):
        clients = {"a": delta_with_norm(1, 0.5), "b": delta_with_norm(2, 0.5)}
        if round_id == "r3":
            clients["c"] = delta_with_norm(3, 0.5)
        submit_round(store, tmp_path, round_id, clients)
        if round_id == "r3":  # a capped client's values are never read: a NaN written over them goes unseen
            payload = next(o.name for o in store.list("updates/a/r3/") if o.name.endswith(".safetensors"))
            data = store.get_bytes(payload)[0]
            store.put_bytes(payload, data[:-4] + np.array([np.nan], np.float32).tobytes())
        report = run_aggregation(store, round_id, build_strategy("fedavg"), privacy=settings, noise_key=KEY,
                                 min_clients=1)  # fmt: skip
    codes = {v.client_id: v.code for v in report.updates}
    assert codes == {"a": "participation_cap", "b": "participation_cap", "c": "accepted"}
    assert "cap is 2" in next(v.reason for v in report.updates if v.client_id == "a")
    assert report.privacy.spent.most_rounds_per_client == 2
    ledger, _ = read_ledger(store)
    assert [e.clients for e in ledger.rounds] == [["a", "b"], ["a", "b"], ["c"]]


def test_server_side_sampling_is_secret_and_charges_every_eligible_client(tmp_path):
    from fedbucket import open_store

    store = open_store((tmp_path / "bucket").as_uri(), create=True)
    deltas = {f"c{i:02d}": delta_with_norm(i, 0.2) for i in range(40)}
    submit_round(store, tmp_path, "r1", deltas)
    settings = dp_settings(clip_norm=1.0, expected_clients=20, sampling_rate=0.5)
    report = run_aggregation(store, "r1", build_strategy("fedavg"), privacy=settings, noise_key=KEY)
    sampled = {v.client_id for v in report.updates if v.accepted}
    left_out = {v.client_id for v in report.updates if v.code == "not_sampled"}
    assert sampled | left_out == set(deltas) and 8 <= len(sampled) <= 32  # Binomial(40, 0.5), far tails excluded
    noise = RoundNoise.derive(KEY, "r1")
    assert sampled == {c for c in deltas if noise.sampled(c, 0.5)}
    ledger, _ = read_ledger(store)
    assert ledger.rounds[0].clients == sorted(deltas)  # left-out clients are charged the sampled mechanism
    manifest = store.get_bytes(LAYOUT.candidate_manifest("r1"))[0].decode()
    assert '"c0' not in manifest and "clip_scale" not in manifest  # the public lineage names no client
    assert report.privacy.mechanism.sampling_rate == 0.5


# -- adaptive clipping -------------------------------------------------------------------------


@pytest.mark.parametrize("start", [100.0, 0.01], ids=["from-above", "from-below"])
@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_adaptive_clip_norm_converges_to_the_quantile(start, quantile):
    """Norms ~ lognormal(0, 0.5): the gamma-quantile is exp(0.5 * Phi^-1(gamma))."""
    settings = dp_settings(target_quantile=quantile, clip_norm=start, expected_clients=100)
    target = math.exp(0.5 * stats.norm.ppf(quantile))
    rng = np.random.default_rng(11)  # the *test's* norm distribution; the mechanism's noise is keyed
    clip, history = start, []
    for r in range(300):
        mechanism = round_mechanism(settings, min_clients=100, clip_norm=clip)
        norms = rng.lognormal(0.0, 0.5, size=100)
        unclipped = int(np.sum(norms <= clip))
        clip, _ = adapt_clip_norm(
            mechanism, unclipped=unclipped, participants=100, noise=RoundNoise.derive(KEY, f"r{r}").count_noise()
        )
        history.append(clip)
    settled = np.exp(np.mean(np.log(history[-100:])))
    assert abs(math.log(settled / target)) < 0.1, (settled, target)
    assert abs(math.log(history[20] / target)) > abs(math.log(settled / target))  # it moved toward it


def test_noise_split_is_one_gaussian_mechanism():
    mechanism = round_mechanism(dp_settings(noise_multiplier=1.1, expected_clients=100), min_clients=3, clip_norm=1)
    sigma_b = mechanism.clipped_count_stddev
    assert sigma_b == pytest.approx(5.0)  # n-bar / 20
    combined = (mechanism.update_noise_multiplier**-2 + (2 * sigma_b) ** -2) ** -0.5
    assert combined == pytest.approx(1.1)
    with pytest.raises(ValueError, match="2 \\* clipped_count_stddev > z"):
        dp_settings(noise_multiplier=2.0, clipped_count_stddev=0.9)


# -- the accountant and the budget -------------------------------------------------------------


def test_accountant_matches_dp_accounting_called_directly():
    history = Counter({(1.0, None, "gaussian"): 3, (2.5, None, "gaussian"): 4, (1.2, 0.1, "gaussian"): 20})
    direct = pld_privacy_accountant.PLDAccountant()
    direct.compose(dp_accounting.GaussianDpEvent(1.0), 3)
    direct.compose(dp_accounting.GaussianDpEvent(2.5), 4)
    direct.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.2)), 20)
    assert epsilon(history, 1e-5) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    assert epsilon(Counter(), 1e-5) == 0.0


def test_budget_refuses_the_round_that_would_exceed_it(store, tmp_path):
    settings = dp_settings(clip_norm=1.0, expected_clients=2, noise_multiplier=2.0, epsilon_budget=5.0)
    affordable = max(k for k in range(1, 20) if epsilon(Counter({(2.0, None, "gaussian"): k}), 1e-5) <= 5.0)
    for r in range(affordable):
        assert check_budget(store, f"r{r}", settings) is not None
        submit_round(store, tmp_path, f"r{r}", {"a": delta_with_norm(r, 0.5), "b": delta_with_norm(50 + r, 0.5)})
        run_aggregation(store, f"r{r}", build_strategy("fedavg"), privacy=settings, noise_key=KEY)
    with pytest.raises(PrivacyBudgetExceeded) as refused:
        check_budget(store, "next", settings)
    message = str(refused.value)
    assert "over the budget of 5 by" in message and f"max_participations to at most {affordable}" in message
    assert check_budget(store, f"r{affordable - 1}", settings) is not None  # a re-run of a charged round passes
    capped = settings.model_copy(update={"max_participations": affordable})
    check_budget(store, "next", capped)  # with the cap, a and b would be refused instead: the round may open
    ledger, _ = read_ledger(store)
    worst, _ = worst_case_after(client_histories(ledger), (2.0, None, "gaussian"), cap=affordable, delta=1e-5)
    assert worst == pytest.approx(epsilon(Counter({(2.0, None, "gaussian"): 1}), 1e-5))  # only a new client could join
    with pytest.raises(ConfigError, match="keep \\[privacy\\] dp = true"):
        check_budget(store, "next", PrivacySettings(dp=False))


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg"])
def test_robust_strategies_are_refused_with_dp(strategy):
    config = FederationConfig(bucket="file:///tmp/x", privacy=PrivacySettings(dp=True))
    with pytest.raises(ConfigError, match="cannot run with dp"):
        RunSettings.resolve(config, "r1", {"strategy": strategy})
    with pytest.raises(ConfigError, match="remove the strategy's clip_norm"):
        RunSettings.resolve(config, "r1", {"strategy_options": {"clip_norm": 1.0}})
    assert RunSettings.resolve(config, "r1", {"strategy": "fedyogi"}).privacy.dp


def test_missing_or_bad_key_is_a_clear_error(store, tmp_path, monkeypatch):
    from fedbucket.server.privacy import load_noise_key

    with pytest.raises(ConfigError, match="FEDBUCKET_DP_KEY is not set"):
        load_noise_key({})
    with pytest.raises(ConfigError, match="not hex"):
        load_noise_key({"FEDBUCKET_DP_KEY": "zz"})
    with pytest.raises(ConfigError, match="at least 32"):
        load_noise_key({"FEDBUCKET_DP_KEY": "ab" * 8})
    assert load_noise_key({"FEDBUCKET_DP_KEY": KEY.hex()}) == KEY
    secret = "projects/p/secrets/s/versions/latest"
    assert load_noise_key({"FEDBUCKET_DP_KEY": KEY.hex()}, secret=secret) == KEY  # the environment wins
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-credentials.json"))
    with pytest.raises(ConfigError, match="could not read the noise key from projects/p/secrets/s"):
        load_noise_key({}, secret=secret)
    submit_round(store, tmp_path, "r1", {"a": delta_with_norm(1, 0.5), "b": delta_with_norm(2, 0.5)})
    with pytest.raises(ConfigError, match="noise key"):
        run_aggregation(store, "r1", build_strategy("fedavg"), privacy=dp_settings())
    assert not store.exists(LAYOUT.candidate_payload("r1"))


def test_aggregation_report_documents_the_mechanism(store, tmp_path):
    submit_round(store, tmp_path, "r1", {"a": delta_with_norm(1, 0.5), "b": delta_with_norm(2, 3.0)})
    run_aggregation(store, "r1", build_strategy("fedavgm"), privacy=dp_settings(clip_norm=1.0), noise_key=KEY)
    report, _ = read_document(store, LAYOUT.aggregation_report("r1"), AggregationReport)
    assert report.privacy.spent.delta == 1e-5 and report.privacy.spent.budget == 8.0
    assert {v.client_id: v.weight for v in report.updates} == {"a": 0.5, "b": 0.5}  # 1 / n-bar, n-bar = min_clients


# -- local DP-SGD on the client ----------------------------------------------------------------


def test_dp_sgd_reports_its_epsilon_keeps_counting_and_refuses_past_its_budget(tmp_path):
    from opacus.accountants import RDPAccountant

    from fedbucket.torch.digits import TASK, digits
    from fedbucket.torch.dp_sgd import DPSGDSettings, LocalPrivacy

    train = digits()[0].subset(np.arange(100))
    training = TrainingConfig(local_epochs=1, batch_size=32, learning_rate=0.1)
    model = TASK.build_model(TINY_MLP, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = tmp_path / "dp-sgd.json"
    settings = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=1.0, epsilon_budget=100.0)
    metrics = LocalPrivacy(settings, state).fit(model, train, training)
    assert any(not (before[k] == v).all() for k, v in model.state_dict().items())  # it trained, in place
    local = LocalPrivacy(settings, state)
    assert local.history == [local.planned(100, training)] == [(1.0, 0.25, 4)]  # what Opacus recorded = the plan
    direct = RDPAccountant()
    direct.history = [(1.0, 0.25, 4)]  # Opacus: 4 Poisson batches per epoch of 100 records at batch size 32
    assert metrics["dp_sgd_epsilon"] == pytest.approx(direct.get_epsilon(1e-5))
    assert set(model.state_dict()) == set(before)  # Opacus's wrapper is gone: the names the server expects

    resumed = LocalPrivacy(settings, state)  # a restarted client keeps counting
    assert resumed.epsilon == pytest.approx(metrics["dp_sgd_epsilon"])
    tight = LocalPrivacy(DPSGDSettings(1.0, 1.0, epsilon_budget=metrics["dp_sgd_epsilon"] * 1.1), state)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrivacyBudgetExceeded, match="past the local budget"):
        tight.fit(model, train, training)
    assert all((trained[k] == v).all() for k, v in model.state_dict().items())  # refused before training
    assert LocalPrivacy(settings, state).history == resumed.history  # nothing was charged


def test_dp_sgd_refuses_batchnorm_models():
    from fedbucket.torch.digits import TASK, digits
    from fedbucket.torch.dp_sgd import DPSGDSettings, LocalPrivacy

    model = TASK.build_model(ModelSpec(name="cnn"), seed=0)
    with pytest.raises(ConfigError, match="BatchNorm"):
        LocalPrivacy(DPSGDSettings(1.0, 1.0, 10.0)).fit(model, digits()[0].subset(np.arange(50)), TrainingConfig())


def test_participant_with_dp_sgd_submits_its_epsilon(tmp_path):
    from fedbucket import Client, open_store
    from fedbucket.protocol.documents import UpdateManifest
    from fedbucket.server.initialise import init_federation
    from fedbucket.torch.digits import TASK, digits
    from fedbucket.torch.dp_sgd import DPSGDSettings, LocalPrivacy
    from fedbucket.torch.participate import Participant

    url = (tmp_path / "bucket").as_uri()
    store = open_store(url, create=True)
    init_federation(store, FederationConfig(bucket=url, model=TINY_MLP), validation=digits()[1])
    open_round(store, round_id="r1", opened_at=utcnow(), deadline_seconds=600, training=TrainingConfig())
    privacy = LocalPrivacy(DPSGDSettings(1.0, 1.0, 50.0), tmp_path / "state.json")
    with Client(url, "hospital-a", cache_dir=tmp_path / "cache") as client:
        participant = Participant(client, TASK, None, digits()[0].subset(np.arange(300)), local_privacy=privacy)
        assert participant.step() == "trained", participant.log
    manifest, _ = read_document(store, LAYOUT.update_manifest("hospital-a", "r1"), UpdateManifest)
    assert manifest.metrics["dp_sgd_epsilon"] == pytest.approx(privacy.epsilon) and privacy.epsilon > 0


def test_charging_refuses_a_round_past_the_budget_before_anything_is_written(store, tmp_path):
    """The publish check can be bypassed (settings changed mid-round): the charge itself refuses."""
    settings = dp_settings(clip_norm=1.0, expected_clients=2, noise_multiplier=2.0, epsilon_budget=2.5)
    submit_round(store, tmp_path, "r1", {"a": delta_with_norm(1, 0.5), "b": delta_with_norm(2, 0.5)})
    run_aggregation(store, "r1", build_strategy("fedavg"), privacy=settings, noise_key=KEY)
    submit_round(store, tmp_path, "r2", {"a": delta_with_norm(3, 0.5), "b": delta_with_norm(4, 0.5)})
    with pytest.raises(PrivacyBudgetExceeded, match=r"2 client\(s\) past the budget of 2\.5"):
        run_aggregation(store, "r2", build_strategy("fedavg"), privacy=settings, noise_key=KEY)
    assert not store.exists(LAYOUT.candidate_payload("r2"))
    ledger, _ = read_ledger(store)
    assert [e.round_id for e in ledger.rounds] == ["r1"]


def test_a_rerun_keeps_its_place_in_the_ledger(store, tmp_path):
    settings = dp_settings(clip_norm=1.0, expected_clients=2)
    for round_id in ("r1", "r2"):
        submit_round(store, tmp_path, round_id, {"a": delta_with_norm(1, 0.5), "b": delta_with_norm(2, 3.0)})
        run_aggregation(store, round_id, build_strategy("fedavg"), privacy=settings, noise_key=KEY)
    ledger, generation = read_ledger(store)
    next_clip = ledger.rounds[-1].privacy.mechanism.next_clip_norm
    run_aggregation(store, "r1", build_strategy("fedavg"), privacy=settings, noise_key=KEY)  # a re-run of r1
    ledger, _ = read_ledger(store)
    assert [e.round_id for e in ledger.rounds] == ["r1", "r2"]
    assert ledger.rounds[-1].privacy.mechanism.next_clip_norm == next_clip  # round 3 still starts from r2's C
    from fedbucket.protocol.errors import PreconditionFailed

    stale = ledger.rounds[0].privacy.mechanism
    with pytest.raises(PreconditionFailed):  # a ledger read before another charge cannot overwrite it
        charge_round(store, "r9", stale, ["z"], settings, ledger=ledger, generation=generation)


@pytest.mark.spark
def test_spark_job_writes_the_same_private_candidate_as_in_process(store, store_url, tmp_path, monkeypatch):
    """The same keyed noise in Spark executors as in one process: byte-identical candidates."""
    from test_aggregation import spark_submit

    submit_round(store, tmp_path, "r1", {f"c{i}": delta_with_norm(i, 0.4 + i) for i in range(3)})
    settings = dp_settings(clip_norm=1.0, expected_clients=3)
    run_aggregation(store, "r1", build_strategy("fedavgm"), privacy=settings, noise_key=KEY, shard_elements=100)
    serial = store.get_bytes(LAYOUT.candidate_payload("r1"))[0]
    arguments = ("--round", "r1", "--strategy", "fedavgm", "--shard-elements", "333")
    missing = spark_submit(store_url, *arguments, "--privacy", settings.model_dump_json())
    assert missing.returncode == 2 and "FEDBUCKET_DP_KEY is not set" in missing.stdout, missing.stdout[-2000:]
    bad = spark_submit(store_url, *arguments, "--privacy", '{"dp": true, "noise_multiplier": -1}')
    assert bad.returncode == 2 and "--privacy" in bad.stdout

    monkeypatch.setenv("FEDBUCKET_DP_KEY", KEY.hex())  # the job's environment, never its arguments
    run = spark_submit(store_url, *arguments, "--privacy", settings.model_dump_json())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert store.get_bytes(LAYOUT.candidate_payload("r1"))[0] == serial  # other engine, other sharding
    assert KEY.hex() not in run.stdout + run.stderr
    assert "dp: clip norm 1" in run.stdout and "epsilon" in run.stdout
