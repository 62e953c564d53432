"""Secure aggregation, the protocol core (no bucket yet): Shamir over GF(2^521 - 1), addressable
masks, the four client phases and the server's unmasking, with dropouts after every phase; the
unmasked sum equals the plain sum of the quantised updates exactly."""

from __future__ import annotations

import contextlib
import itertools
import secrets

import numpy as np
import pytest
from scipy import stats

from conftest import TINY_SPEC, tiny_model
from fedbucket.client.secagg import SecAggClient
from fedbucket.protocol.documents import SecAggInbox, read_document
from fedbucket.protocol.errors import ConfigError
from fedbucket.protocol.layout import LAYOUT
from fedbucket.protocol.secagg import (
    PRIME,
    InvalidShare,
    Quantiser,
    combine_shares,
    mask_words,
    message_context,
    open_sealed,
    seal,
    split_secret,
)
from fedbucket.server.aggregation import run_aggregation
from fedbucket.server.secagg import SecAggAbandoned, make_setup, neighbour_graph, plan_unmasking, unmask_range
from fedbucket.server.strategies import build_strategy

ROUND = "r1"
SIZE = 1003  # not a multiple of the 4 words per AES block


def test_shamir_any_threshold_subset_reconstructs_and_fewer_do_not():
    secret = secrets.token_bytes(32)
    shares = split_secret(secret, 3, [1, 2, 3, 4, 5])
    for subset in itertools.combinations(shares, 3):
        assert combine_shares({x: shares[x] for x in subset}, 3) == secret
    two = {x: shares[x] for x in (1, 4)}
    with pytest.raises(ValueError, match="needs 3"):
        combine_shares(two, 3)
    # two shares are consistent with any secret: interpolating them as a line gives a random value
    assert combine_shares(two, 2, length=66) != secret.rjust(66, b"\0")
    assert all(int.from_bytes(s, "big") < PRIME for s in shares.values())


def test_masks_are_addressable_slices():
    seed = secrets.token_bytes(32)
    whole = mask_words(seed, 0, 5000)
    for start, stop in ((0, 1), (3, 9), (1001, 3999), (4999, 5000)):
        assert np.array_equal(mask_words(seed, start, stop), whole[start:stop])
    assert whole.dtype == np.uint32


def test_aead_binds_round_sender_and_receiver():
    key = secrets.token_bytes(32)
    sealed = seal(key, b"share", message_context("r1", "a", "b"))
    assert open_sealed(key, sealed, message_context("r1", "a", "b")) == b"share"
    for other in (message_context("r2", "a", "b"), message_context("r1", "c", "b"), message_context("r1", "a", "c")):
        with pytest.raises(InvalidShare) as refused:
            open_sealed(key, sealed, other)  # replayed into another round, or to / from another client
        assert refused.value.code == "invalid_share"
    forged = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(InvalidShare):
        open_sealed(key, forged, message_context("r1", "a", "b"))


def run_protocol(n: int, drop: dict[int, float], *, degree: int | None = None, seed: int = 0):
    """n clients through the four phases; ``drop[p]``: share of the remaining clients lost after phase p.
    Returns (unmasked ring sum, plain ring sum of the survivors' quantised values, survivors)."""
    rng = np.random.default_rng(seed)  # the test's choices of data and dropouts, not secrets
    quantiser = Quantiser.for_clients(1.0, n)
    clients = {f"c{i:03d}": SecAggClient(f"c{i:03d}", ROUND) for i in range(n)}
    updates = {c: quantiser.quantise(rng.uniform(-1, 1, SIZE)) for c in clients}

    def keep(alive: list[str], phase: int) -> list[str]:
        lost = round(drop.get(phase, 0.0) * len(alive))
        gone = set(rng.choice(alive, size=lost, replace=False)) if lost else set()
        return [c for c in alive if c not in gone]

    advertised = {c: clients[c].advertise() for c in keep(sorted(clients), 0)}
    alive = keep(sorted(advertised), 1)  # lost after advertising: never share keys
    setup = make_setup(ROUND, advertised, degree=degree)
    outboxes = {c: clients[c].share_keys(setup) for c in alive}
    u2 = keep(sorted(outboxes), 2)  # their shares are not delivered
    for c in u2:
        clients[c].receive({s: outboxes[s][c] for s in u2 if c in outboxes[s]})
    masked = {c: clients[c].masked_input(updates[c], u2) for c in u2}
    u3 = keep(sorted(masked), 3)  # masked input lost
    responses = {}
    for c in keep(u3, 4):  # some survivors never answer phase 4; one below its threshold refuses to
        with contextlib.suppress(ConfigError):
            responses[c] = clients[c].unmask(u3)
    total = np.zeros(SIZE, dtype=np.uint32)
    for c in u3:
        total += masked[c]
    plan = plan_unmasking(setup, u2, u3, responses)
    unmasked = np.concatenate([unmask_range(total[a : a + 250], plan, a) for a in range(0, SIZE, 250)])
    plain = np.zeros(SIZE, dtype=np.uint32)
    for c in u3:
        plain += updates[c]
    return unmasked, plain, u3


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("phase", [1, 2, 3, 4])
def test_unmasked_sum_is_exact_with_dropouts_after_each_phase(phase, fraction):
    unmasked, plain, survivors = run_protocol(20, {phase: fraction}, seed=phase)
    assert np.array_equal(unmasked, plain)
    assert len(survivors) == 20 - (round(fraction * 20) if phase in (1, 2, 3) else 0)


def test_sparse_secagg_plus_graph_with_dropouts_everywhere():
    graph = neighbour_graph([f"c{i:03d}" for i in range(40)], 16)
    assert {len(v) for v in graph.values()} == {16} and all(c not in v for c, v in graph.items())
    assert all(c in graph[v] for c, vs in graph.items() for v in vs)  # symmetric
    # The graph is drawn with the OS's randomness, so the losses (2 + 2 + 1 of 40) stay below the 7 that
    # any neighbourhood of 16 can spare at threshold 9: the test passes whatever graph is drawn.
    unmasked, plain, _ = run_protocol(40, {1: 0.05, 2: 0.05, 3: 0.0, 4: 0.025}, degree=16, seed=7)
    assert np.array_equal(unmasked, plain)


def test_below_the_threshold_the_round_is_abandoned_with_a_reason():
    with pytest.raises(SecAggAbandoned, match="fewer than the threshold"):
        run_protocol(10, {3: 0.7}, seed=3)


def test_a_client_never_reveals_both_secrets_of_a_neighbour():
    clients = {c: SecAggClient(c, ROUND) for c in ("a", "b", "c", "d")}
    setup = make_setup(ROUND, {c: x.advertise() for c, x in clients.items()})
    outboxes = {c: x.share_keys(setup) for c, x in clients.items()}
    for c, x in clients.items():
        x.receive({s: outboxes[s][c] for s in clients if s != c})
    for x in clients.values():
        x.masked_input(np.zeros(8, np.uint32), list(clients))
    first = clients["a"].unmask(["a", "b", "c", "d"])
    assert {kind for kind, _ in first.values()} == {"seed"}
    with pytest.raises(ConfigError, match="already answered"):
        clients["a"].unmask(["a", "b", "c"])  # now claiming d dropped: d's key share would follow its seed share


def test_a_forged_share_is_set_aside_with_its_reason_and_the_others_are_kept():
    a, b, c = (SecAggClient(x, ROUND) for x in ("a", "b", "c"))
    setup = make_setup(ROUND, {x.client_id: x.advertise() for x in (a, b, c)})
    to_b = a.share_keys(setup)["b"]
    c_to_b = c.share_keys(setup)["b"]
    b.share_keys(setup)
    rejected = b.receive({"a": to_b[:-1] + bytes([to_b[-1] ^ 0x55]), "c": c_to_b})
    assert set(rejected) == {"a"} and "authentication failed" in rejected["a"]
    assert "authentication failed" in b.receive({"c": to_b})["c"]  # a's message presented as c's
    with pytest.raises(InvalidShare):  # the primitive underneath raises with its code
        b._open("a", to_b[:-1] + bytes([to_b[-1] ^ 0x55]))
    assert InvalidShare.code == "invalid_share"
    b.masked_input(np.zeros(4, np.uint32), ["a", "b", "c"])  # still masks with a: the sum stays right
    assert set(b.unmask(["a", "b", "c"])) == {"b", "c"}  # its own seed share and c's; none of a's secrets


def test_a_masked_input_looks_uniform():
    """The server's view of one client: its masked input. Even for an all-zero update, the 32-bit
    words are uniform (chi-square on the top byte and on the bottom byte)."""
    unmasked_clients = [SecAggClient(c, ROUND) for c in ("a", "b", "c")]
    setup = make_setup(ROUND, {x.client_id: x.advertise() for x in unmasked_clients})
    outboxes = {x.client_id: x.share_keys(setup) for x in unmasked_clients}
    for x in unmasked_clients:
        x.receive({s: outboxes[s][x.client_id] for s in outboxes if s != x.client_id})
    masked = unmasked_clients[0].masked_input(np.zeros(200_000, np.uint32), ["a", "b", "c"])
    for byte in (masked >> 24, masked & 0xFF):
        counts = np.bincount(byte.astype(np.int64), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4


def test_quantiser_round_trip_within_one_level():
    quantiser = Quantiser.for_clients(0.5, 100)
    rng = np.random.default_rng(0)
    values = [rng.uniform(-0.5, 0.5, 1000) for _ in range(100)]
    total = np.zeros(1000, np.uint32)
    for v in values:
        total += quantiser.quantise(v)
    step = 2 * 0.5 / quantiser.levels
    np.testing.assert_allclose(quantiser.dequantise_sum(total, 100), np.sum(values, axis=0), atol=100 * step / 2 + 1e-9)
    assert int(quantiser.levels) * 100 < 2**32  # the sum of 100 never wraps


# -- over the bucket ---------------------------------------------------------------------------


class RecordingStore:
    """Passes every call to a store and records the names a client read or wrote."""

    def __init__(self, store) -> None:
        self._store, self.touched = store, set()

    def __getattr__(self, attribute):
        method = getattr(self._store, attribute)

        def call(name=None, *args, **kwargs):
            if isinstance(name, str):
                self.touched.add(name)
            return method(name, *args, **kwargs) if name is not None else method(*args, **kwargs)

        return call


def test_phases_over_the_bucket_with_dropouts_and_each_client_reads_only_its_own(store):
    from fedbucket.client.secagg import post_keys, post_shares, post_unmask, read_roster, read_setup, receive_inbox
    from fedbucket.protocol.layout import LAYOUT
    from fedbucket.server.secagg import collect_unmasking, publish_roster, publish_setup, route_shares

    quantiser = Quantiser.for_clients(1.0, 16)
    rng = np.random.default_rng(5)
    names = [f"h{i:02d}" for i in range(8)]
    sessions = {c: SecAggClient(c, ROUND) for c in names}
    views = {c: RecordingStore(store) for c in names}
    for c in names[:-1]:  # h07 never advertises
        post_keys(views[c], sessions[c])
    setup = publish_setup(store, ROUND, clip_norm=1.0, max_clients=16)
    assert sorted(setup.keys) == names[:-1]
    for c in names[:-2]:  # h06 drops after advertising
        post_shares(views[c], sessions[c], read_setup(views[c], ROUND)[0])
    shared = route_shares(store, setup)
    assert shared == names[:-2]
    for c in shared:
        receive_inbox(views[c], sessions[c])
    updates = {c: quantiser.quantise(rng.uniform(-1, 1, 64)) for c in shared}
    masked = {c: sessions[c].masked_input(updates[c], read_roster(views[c], ROUND, "shared")) for c in shared[:-1]}
    survivors = sorted(masked)  # h05 drops after sharing: its pairwise masks must be removed
    publish_roster(store, ROUND, "masked", survivors)
    for c in survivors:
        post_unmask(views[c], sessions[c], read_roster(views[c], ROUND, "masked"))
    plan = plan_unmasking(setup, shared, survivors, collect_unmasking(store, ROUND))
    total = np.zeros(64, np.uint32)
    for c in survivors:
        total += masked[c]
    expected = np.zeros(64, np.uint32)
    for c in survivors:
        expected += updates[c]
    assert np.array_equal(unmask_range(total, plan, 0), expected)

    public = {LAYOUT.secagg_setup(ROUND), LAYOUT.secagg_roster(ROUND, "shared"), LAYOUT.secagg_roster(ROUND, "masked")}
    for c, view in views.items():  # what terraform's conditions allow a client: the public documents, its prefix
        assert all(name in public or name.startswith(f"updates/{c}/") for name in view.touched), (c, view.touched)
    inbox, _ = read_document(store, LAYOUT.secagg_client("h00", ROUND, "inbox"), SecAggInbox)
    assert set(inbox.sealed) == set(shared) - {"h00"}  # only shares addressed to h00, from clients that shared


def test_a_corrupted_share_is_detected_not_silently_combined():
    secret = secrets.token_bytes(32)
    shares = split_secret(secret, 3, [1, 2, 3, 4, 5])
    bad = dict(shares)
    bad[2] = ((int.from_bytes(bad[2], "big") + 1) % PRIME).to_bytes(66, "big")  # a crafted offset, still in range
    with pytest.raises(ValueError, match="inconsistent"):
        combine_shares(bad, 3)  # the shares beyond the first three must lie on the same polynomial
    assert combine_shares({x: shares[x] for x in (1, 3, 4, 5)}, 3) == secret


def test_the_server_ignores_a_responder_that_answers_against_the_roster():
    clients = {c: SecAggClient(c, ROUND) for c in ("a", "b", "c", "d", "e")}
    setup = make_setup(ROUND, {c: x.advertise() for c, x in clients.items()})
    outboxes = {c: x.share_keys(setup) for c, x in clients.items()}
    for c, x in clients.items():
        x.receive({s: outboxes[s][c] for s in clients if s != c})
    values = {c: np.full(8, i + 1, np.uint32) for i, c in enumerate(clients)}
    masked = {c: x.masked_input(values[c], list(clients)) for c, x in clients.items()}
    survivors = list(clients)
    responses = {c: x.unmask(survivors) for c, x in clients.items()}
    liar = dict(responses["e"])
    liar["a"] = ("key", liar["a"][1])  # claims a dropped: asks for a's key share it is not entitled to
    responses["e"] = liar
    plan = plan_unmasking(setup, survivors, survivors, responses)  # e's answers are not used; 4 of 5 remain
    total = sum((masked[c] for c in survivors), np.zeros(8, np.uint32))
    assert np.array_equal(unmask_range(total, plan, 0), np.full(8, 15, np.uint32))
    assert make_setup(ROUND, {c: x.advertise() for c, x in clients.items()}, threshold=2).threshold == 3  # a floor
    with pytest.raises(SecAggAbandoned, match="strict majority"):
        make_setup(ROUND, {c: x.advertise() for c, x in clients.items()}, threshold=5)  # more than the neighbours
    with pytest.raises(ValueError, match="finite"):
        Quantiser.for_clients(1.0, 4).quantise(np.array([0.0, np.nan]))


# -- a whole secure round through the bucket and the aggregation (no Airflow) -------------------


def _open_secure_round(store, *, max_clients=8, clip=0.5, degree=None, base=None, distributed_dp=None):
    from fedbucket.protocol.documents import TrainingConfig, utcnow
    from fedbucket.server.config import SecureAggregationSettings
    from fedbucket.server.rounds import open_round, publish_model, set_current_model

    manifest = publish_model(store, tiny_model() if base is None else base, version="init", model=TINY_SPEC)
    set_current_model(store, manifest, expected_generation=0)
    secure = SecureAggregationSettings(enabled=True, clip_norm=clip, degree=degree, phase_seconds=3600)
    return open_round(
        store,
        round_id=ROUND,
        opened_at=utcnow(),
        deadline_seconds=3600,
        training=TrainingConfig(),
        min_clients=3,
        max_clients=max_clients,
        secure_aggregation=secure,
        distributed_dp=distributed_dp,
    )


def _secure_round(store, tmp_path, deltas, drop_after: dict[str, str], *, base=None, privacy=None):
    """Run the four phases for ``deltas`` (client -> delta); a client in ``drop_after`` stops
    after that phase (``keys``, ``shares``, ``masked``). Returns the aggregation report."""
    from fedbucket.client.sdk import upload_update
    from fedbucket.client.secagg import SecureRound
    from fedbucket.protocol.documents import utcnow
    from fedbucket.server.aggregation import run_aggregation
    from fedbucket.server.rounds import freeze_round
    from fedbucket.server.secagg import publish_masked_roster, publish_setup, read_setup_document, route_shares
    from fedbucket.server.strategies import build_strategy

    distributed = (privacy.noise_multiplier, 4) if privacy is not None else None
    task = _open_secure_round(store, base=base, distributed_dp=distributed)
    rounds = {
        c: SecureRound(
            store, task, c, lambda path, c=c: upload_update(store, task, c, path, num_examples=10), poll_seconds=0.01
        )
        for c in deltas
    }
    for r in rounds.values():
        r.advertise()
    publish_setup(store, ROUND, clip_norm=0.5, max_clients=8)
    alive = [c for c in rounds if drop_after.get(c) != "keys"]
    for c in alive:
        rounds[c].share()
    route_shares(store, read_setup_document(store, ROUND))
    alive = [c for c in alive if drop_after.get(c) != "shares"]
    for c in alive:
        rounds[c].send_masked(deltas[c], tmp_dir=tmp_path)
    closing = freeze_round(store, task, reason="quorum", closed_at=utcnow())
    publish_masked_roster(store, task, closing)
    for c in [c for c in alive if drop_after.get(c) != "masked"]:
        rounds[c].unmask()
    return task, run_aggregation(store, ROUND, build_strategy("fedavg", {}), privacy=privacy)


@pytest.mark.parametrize("phase", ["keys", "shares", "masked"])
def test_a_secure_round_releases_the_mean_of_the_survivors_clipped_updates(store, tmp_path, phase):
    """Through the bucket and ``run_aggregation``: the candidate is base + the equal-weight mean of
    the survivors' clipped updates (to within quantisation), dropouts after ``phase`` included;
    integer buffers stay the base's; the report names who took part in each phase."""
    from fedbucket.protocol.documents import ModelManifest
    from fedbucket.protocol.tensors import tensors_from_bytes

    rng = np.random.default_rng(7)
    base = tiny_model()
    deltas = {
        f"c{i}": {
            n: (rng.standard_normal(v.shape) * 0.1).astype(np.float32) for n, v in base.items() if v.dtype.kind == "f"
        }
        for i in range(6)
    }
    deltas["c0"] = {n: v * 100 for n, v in deltas["c0"].items()}  # far beyond the clip norm: clipped by its client
    drops = {"c1": phase, "c4": phase}
    _, report = _secure_round(store, tmp_path, deltas, drops)
    assert report.status == "aggregated", report.message
    summary = report.secure_aggregation
    # dropped after the masked input: in the sum, silent in phase 4 (the others' answers suffice)
    survivors = list(deltas) if phase == "masked" else [c for c in deltas if c not in drops]
    assert summary.masked == survivors
    assert summary.responded == [c for c in deltas if c not in drops]
    assert summary.dropped_after_shares == (["c1", "c4"] if phase == "shares" else [])
    assert summary.shared == (survivors if phase != "shares" else list(deltas))
    assert sorted(u.client_id for u in report.updates if u.accepted) == survivors
    assert all(u.weight == pytest.approx(1 / len(survivors)) for u in report.updates if u.accepted)

    def clipped(delta):
        norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))
        return {n: v * min(1.0, 0.5 / norm) for n, v in delta.items()}

    candidate = tensors_from_bytes(store.get_bytes(LAYOUT.candidate_payload(ROUND))[0])
    step = 2 * 0.5 / ((2**32 - 1) // 8)  # one quantisation level
    for name, value in base.items():
        if value.dtype.kind != "f":
            assert candidate[name] == value  # integer buffers are not sent under secure aggregation
            continue
        mean = np.mean([clipped(deltas[c])[name] for c in survivors], axis=0)
        np.testing.assert_allclose(candidate[name], value + mean, atol=step + 1e-6)
    manifest, _ = read_document(store, LAYOUT.candidate_manifest(ROUND), ModelManifest)
    assert manifest.sha256 == report.candidate_sha256


def test_a_secure_round_below_the_threshold_is_abandoned_with_its_reason(store, tmp_path):
    base = tiny_model()
    deltas = {f"c{i}": {n: np.zeros_like(v) for n, v in base.items() if v.dtype.kind == "f"} for i in range(5)}
    # 5 members, threshold 3: after 3 masked inputs only 2 answer the unmasking
    _, report = _secure_round(store, tmp_path, deltas, {"c0": "shares", "c1": "shares", "c2": "masked", "c3": "masked"})
    assert report.status == "below_quorum"
    assert report.message.startswith("secure aggregation abandoned:") and "fewer than the threshold" in report.message
    assert not store.exists(LAYOUT.candidate_payload(ROUND))


def test_discrete_gaussian_noise_has_the_exact_distribution():
    """The client's sampler against the discrete Gaussian's probability mass (chi-square), and its
    spread at the sizes distributed DP uses."""
    from fedbucket.client.secagg import discrete_gaussian

    draws = discrete_gaussian(200_000, 1.3)
    ks = np.arange(-5, 6)
    mass = np.exp(-(ks**2) / (2 * 1.3**2))
    mass /= np.exp(-(np.arange(-60, 61) ** 2) / (2 * 1.3**2)).sum()
    observed = np.array([np.sum(draws == k) for k in ks] + [np.sum(np.abs(draws) > 5)])
    expected = np.append(mass, max(1e-12, 1 - mass.sum())) * draws.size
    assert stats.chisquare(observed[:-1], expected[:-1] * observed[:-1].sum() / expected[:-1].sum()).pvalue > 1e-4
    big = discrete_gaussian(100_000, 2.5e7)
    assert big.dtype == np.int64 and abs(big.std() / 2.5e7 - 1) < 0.02 and abs(big.mean()) < 2.5e7 * 0.02


def test_a_noisy_ring_sum_decodes_across_the_wrap():
    """With distributed DP a sum can fall below 0 (it wraps to the top of the ring): decoded back."""
    from fedbucket.protocol.secagg import ring_levels

    levels = ring_levels(4, headroom_per_level=20.0, headroom=1000.0)
    quantiser = Quantiser(1.0, levels)
    values = np.array([-1.0, -1.0, 0.0, 1.0])
    noise = np.array([-levels, levels // 3, 0, levels], dtype=np.int64)
    ring = ((4 * quantiser.quantise(values).astype(np.int64) + noise) % 2**32).astype(np.uint32)
    decoded = quantiser.dequantise_sum(ring, 4)
    np.testing.assert_allclose(decoded, 4 * values + noise / quantiser.scale, atol=4 / quantiser.scale)


def test_distributed_dp_charges_the_round_and_the_released_mean_carries_the_promised_noise(store, tmp_path):
    """Distributed DP under secure aggregation: every client adds discrete Gaussian noise sized for
    4 survivors; the ledger charges each one the zCDP of z (RDP accountant), the candidate is the mean
    plus noise of the stated std, and the public lineage names no client."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    from fedbucket.protocol.documents import ModelManifest
    from fedbucket.protocol.tensors import tensors_from_bytes
    from fedbucket.server.config import PrivacySettings
    from fedbucket.server.privacy import DISTRIBUTED, read_ledger

    base = {"w": np.zeros((100, 200), np.float32), "steps": np.array(1, np.int64)}
    rng = np.random.default_rng(3)
    deltas = {f"c{i}": {"w": (rng.standard_normal((100, 200)) * 1e-3).astype(np.float32)} for i in range(6)}
    privacy = PrivacySettings(dp=True, noise_multiplier=0.8, adaptive_clipping=False, epsilon_budget=50.0)
    _, report = _secure_round(store, tmp_path, deltas, {"c5": "shares"}, base=base, privacy=privacy)
    assert report.status == "aggregated", report.message
    mechanism = report.privacy.mechanism
    assert mechanism.kind == DISTRIBUTED and mechanism.charged_clients == 5 and mechanism.denominator == 5
    direct = rdp_privacy_accountant.RdpAccountant()
    direct.compose(dp_accounting.ZCDpEvent(rho=1 / (2 * 0.8**2)))
    assert report.privacy.spent.epsilon == pytest.approx(direct.get_epsilon(1e-5))
    assert report.privacy.spent.accountant == "dp-accounting RDP"
    ledger, _ = read_ledger(store)
    assert ledger.rounds[0].clients == ["c0", "c1", "c2", "c3", "c4"]
    candidate = tensors_from_bytes(store.get_bytes(LAYOUT.candidate_payload(ROUND))[0])
    noise = candidate["w"] - np.mean([deltas[c]["w"] for c in ("c0", "c1", "c2", "c3", "c4")], axis=0)
    assert abs(noise.std() / mechanism.noise_stddev - 1) < 0.05  # 20,000 coordinates
    assert abs(noise.mean()) < 4 * mechanism.noise_stddev / np.sqrt(noise.size)
    manifest, _ = read_document(store, LAYOUT.candidate_manifest(ROUND), ModelManifest)
    assert "accepted" not in manifest.lineage and manifest.lineage["privacy"]["mechanism"]["kind"] == DISTRIBUTED


def test_distributed_dp_with_fewer_survivors_than_the_noise_was_sized_for_is_abandoned(store, tmp_path):
    from fedbucket.server.config import PrivacySettings

    deltas = {f"c{i}": {n: np.zeros_like(v) for n, v in tiny_model().items() if v.dtype.kind == "f"} for i in range(5)}
    privacy = PrivacySettings(dp=True, noise_multiplier=1.0, adaptive_clipping=False)
    with pytest.raises(ConfigError, match=r"3 survivor.*minimum of 4; refusing to unmask"):  # the clients refuse
        _secure_round(store, tmp_path, deltas, {"c0": "shares", "c1": "shares"}, privacy=privacy)
    report = run_aggregation(store, ROUND, build_strategy("fedavg", {}), privacy=privacy)  # the server gets nothing
    assert report.status == "below_quorum" and report.message.startswith("secure aggregation abandoned")
    assert report.privacy is None and not store.exists(LAYOUT.privacy_ledger)
    assert not store.exists(LAYOUT.candidate_payload(ROUND))


def test_the_default_graph_is_full_for_small_rounds_and_logarithmic_beyond():
    from fedbucket.server.secagg import default_degree

    assert default_degree(7) is None and default_degree(32) is None
    assert default_degree(33) == 12 and default_degree(200) == 16 and default_degree(1000) == 20
    setup = make_setup(ROUND, {f"c{i:02d}": SecAggClient(f"c{i:02d}", ROUND).advertise() for i in range(40)})
    assert {len(v) for v in setup.neighbours.values()} == {12} and setup.threshold == 7


def test_an_odd_neighbourhood_needs_more_than_half_of_the_holders_so_two_views_never_rebuild_both_secrets():
    """Review finding: with 4 clients (3 neighbours each) a threshold of 2 let a server that told b, c
    'a dropped' and a, d 'a survived' rebuild a's seed (a's own share + d's) and key (b's + c's).
    The threshold is now a strict majority of the 4 holders: 3; clients refuse anything less."""
    from fedbucket.protocol.secagg import Setup, minimum_threshold

    clients = {c: SecAggClient(c, ROUND) for c in "abcd"}
    setup = make_setup(ROUND, {c: x.advertise() for c, x in clients.items()})
    assert setup.threshold == minimum_threshold(3) == 3
    weak = Setup(setup.round_id, setup.keys, setup.x, setup.neighbours, threshold=2)
    with pytest.raises(ConfigError, match="unsafe"):
        clients["a"].share_keys(weak)  # a server cannot talk a client into it either
    assert make_setup(ROUND, {c: x.advertise() for c, x in clients.items()}, threshold=2).threshold == 3


def test_secure_aggregation_settings_refuse_impossible_graphs_at_load():
    from pydantic import ValidationError

    from fedbucket.server.config import SecureAggregationSettings

    with pytest.raises(ValidationError, match="even"):
        SecureAggregationSettings(enabled=True, degree=5)
    with pytest.raises(ValidationError, match="strict majority"):
        SecureAggregationSettings(enabled=True, degree=6, threshold=3)
    SecureAggregationSettings(enabled=True, degree=6, threshold=4)


def test_rosters_and_the_setup_are_written_once(store):
    """A re-run (or a zombie attempt) of a phase step gets the document written first: clients mask
    by it, so it never changes."""
    from fedbucket.server.secagg import publish_roster, publish_setup

    task = _open_secure_round(store)
    for c in ("a", "b", "c", "d"):
        from fedbucket.client.secagg import post_keys

        post_keys(store, SecAggClient(c, ROUND))
    first = publish_setup(store, ROUND, clip_norm=0.5, max_clients=8, degree=None)
    again = publish_setup(store, ROUND, clip_norm=0.5, max_clients=8, degree=None)
    assert again.neighbours == first.neighbours and again.x == first.x
    assert publish_roster(store, task.round_id, "shared", ["a", "b", "c"]) == ["a", "b", "c"]
    assert publish_roster(store, task.round_id, "shared", ["a", "b"]) == ["a", "b", "c"]


def test_a_phase_waits_while_answers_keep_coming_and_until_the_unmasking_can_finish():
    from datetime import timedelta

    from fedbucket.protocol.documents import utcnow
    from fedbucket.server.config import WaitSettings
    from fedbucket.server.rounds import wait_decision
    from fedbucket.server.secagg import Arrival, PhaseSurvey

    now = utcnow()
    settings = WaitSettings(min_clients=2, max_clients=5, grace_seconds=5, grace_after="last")
    survey = PhaseSurvey(on_time=[Arrival("a", now - timedelta(seconds=20)), Arrival("b", now - timedelta(seconds=1))])
    deadline = now + timedelta(hours=1)
    assert wait_decision(survey, now=now, deadline=deadline, settings=settings) is None  # b arrived 1 s ago
    assert wait_decision(survey, now=now + timedelta(seconds=6), deadline=deadline, settings=settings) == "quorum"
    survey.ready = False  # e.g. a survivor's seed still lacks shares
    assert wait_decision(survey, now=now + timedelta(seconds=6), deadline=deadline, settings=settings) is None
    later = deadline + timedelta(seconds=10)
    assert wait_decision(survey, now=later, deadline=deadline, settings=settings) == "deadline"


def _five_answered():
    clients = {c: SecAggClient(c, ROUND) for c in ("a", "b", "c", "d", "e", "f")}
    setup = make_setup(ROUND, {c: x.advertise() for c, x in clients.items()})  # k = 5, t = 4
    outboxes = {c: x.share_keys(setup) for c, x in clients.items()}
    for c, x in clients.items():
        x.receive({s: outboxes[s][c] for s in clients if s != c})
    values = {c: np.full(8, i + 1, np.uint32) for i, c in enumerate(clients)}
    masked = {c: x.masked_input(values[c], list(clients)) for c, x in clients.items()}
    survivors = list(clients)
    return setup, survivors, masked, {c: x.unmask(survivors) for c, x in clients.items()}


def test_one_corrupted_share_is_left_out_when_there_are_spares_and_abandons_when_there_are_none():
    """A seed share shifted by a crafted offset (Shamir is linear: it would shift the seed) is found
    by the seed digest its owner advertised: with spare shares the others rebuild the seed; with
    exactly the threshold the round is abandoned — never a silently wrong sum."""
    setup, survivors, masked, responses = _five_answered()
    kind, share = responses["e"]["a"]
    responses["e"] = {**responses["e"], "a": (kind, ((int.from_bytes(share, "big") + 7) % PRIME).to_bytes(66, "big"))}
    plan = plan_unmasking(setup, survivors, survivors, responses)  # 6 holders of a's seed, t = 4: e's is left out
    total = sum((masked[c] for c in survivors), np.zeros(8, np.uint32))
    assert np.array_equal(unmask_range(total, plan, 0), np.full(8, 21, np.uint32))
    exactly_t = {c: responses[c] for c in ("b", "c", "e")} | {"a": {"a": responses["a"]["a"]}}
    with pytest.raises(SecAggAbandoned, match=r"a's self-mask seed.*corrupted"):
        plan_unmasking(setup, survivors, survivors, exactly_t)


def test_a_small_order_public_key_is_refused_everywhere_instead_of_crashing(store):
    """A client posting an X25519 key of small order (all zeros) must not crash the server's steps or
    its neighbours: the server leaves it out of the setup; a setup carrying one is refused."""
    from fedbucket.client.secagg import post_keys
    from fedbucket.protocol.documents import SecAggKeys, write_document
    from fedbucket.protocol.secagg import agree, b64, setup_document, setup_from_document
    from fedbucket.server.secagg import publish_setup

    _open_secure_round(store)
    for c in ("a", "b", "c"):
        post_keys(store, SecAggClient(c, ROUND))
    good = SecAggClient("d", ROUND).advertise()
    zeros = b64(bytes(32))
    evil = SecAggKeys(client_id="z", round_id=ROUND, cipher_public=zeros, mask_public=zeros,
                      seed_digest=b64(good.seed_digest))  # fmt: skip
    write_document(store, LAYOUT.secagg_client("z", ROUND, "keys"), evil)
    setup = publish_setup(store, ROUND, clip_norm=0.5, max_clients=8)
    assert sorted(setup.keys) == ["a", "b", "c"]
    with pytest.raises(InvalidShare, match="small order"):
        agree(bytes(range(32)), bytes(32), "mask", b"ctx")
    forged = setup_document(setup, clip_norm=0.5, max_clients=8)
    forged.members["a"].mask_public = zeros
    with pytest.raises(InvalidShare, match="unusable public key"):
        setup_from_document(forged)


def test_the_masked_wait_never_ends_by_quorum_below_what_the_round_needs(store):
    """Review finding: a quorum of 3 masked inputs out of 10 members (threshold 6) ended the wait,
    then the close abandoned with hours left. The wait's quorum is what the round can release."""
    from fedbucket.server.config import RoundSettings, SecureAggregationSettings
    from fedbucket.server.secagg import phase_wait_settings

    task = _open_secure_round(store, max_clients=10)
    settings = phase_wait_settings(
        task, "masked", [f"c{i}" for i in range(10)], round_settings=RoundSettings(min_clients=3, max_clients=10),
        secure=SecureAggregationSettings(enabled=True), threshold=6,
    )  # fmt: skip
    assert settings.min_clients == 6 and settings.quorum_at_deadline == 6 and settings.max_clients == 10
