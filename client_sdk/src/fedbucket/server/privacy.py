"""Central differential privacy: DP-FedAvg with adaptive clipping, its noise, its accountant and
the federation's ledger (docs/privacy.md).

The mechanism of one round (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models", arXiv:1710.06963; Andrew et al. 2021, "Differentially Private Learning with
Adaptive Clipping", arXiv:1905.03871):

- every accepted delta is scaled to L2 norm at most ``C``; the clipped deltas are summed with equal
  weights (a client-reported example count is unbounded, so it must not weight a DP sum);
- Gaussian noise of std ``z_delta * C`` is added to every coordinate of the sum, which is divided
  by the fixed denominator ``n-bar``;
- with adaptive clipping the count of unclipped updates gets noise of std ``sigma_b``, and
  ``C <- C * exp(-eta * (b - gamma))`` with ``b`` the noisy unclipped share: C grows when more than
  ``1 - gamma`` of the updates were clipped. The sum (sensitivity C) and the centred count
  (sensitivity 1/2) are one Gaussian mechanism with ``z**-2 = z_delta**-2 + (2 sigma_b)**-2``.

Invariants:

- The noise is a pure function of (secret key, round id, tensor name, element index): AES-256-CTR
  keyed by HKDF-SHA256 from the server's secret, with the element index as the counter block. An
  executor expands only its own slice, a re-run of a round writes the same candidate bytes, and
  nobody who can read the bucket (no key there) can subtract the noise. The key never enters the
  bucket or a document.
- A round is charged in the ledger *before* its candidate is written: a crash in between
  over-charges (safe), never releases an uncharged model.
- The accountant is dp-accounting's PLD accountant. Without server-side sampling no amplification
  is claimed: a client's epsilon composes the rounds it was charged for (clients choose when they
  take part), and the per-client participation cap bounds that number.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedbucket.protocol.documents import (
    MAX_LEDGER_BYTES,
    LedgerRound,
    PrivacyLedger,
    PrivacyMechanism,
    PrivacySpent,
    RoundPrivacy,
    read_optional,
    utcnow,
    write_document,
)
from fedbucket.protocol.errors import ConfigError, PrivacyBudgetExceeded
from fedbucket.protocol.layout import LAYOUT, BucketLayout
from fedbucket.protocol.secagg import ring_levels
from fedbucket.protocol.storage import ObjectStore
from fedbucket.server.config import PrivacySettings

#: The environment variable holding the noise key (64 hex digits) for the aggregation job.
KEY_ENVIRONMENT = "FEDBUCKET_DP_KEY"
KEY_BYTES = 32
#: Normals drawn per AES-CTR call: bounds a shard's scratch memory (16 bytes of keystream each).
_NOISE_CHUNK = 1 << 20
ACCOUNTANT = "dp-accounting PLD"
#: Histories with a distributed round: dp-accounting's RDP accountant composes zCDP and Gaussians.
RDP_ACCOUNTANT = "dp-accounting RDP"
DISTRIBUTED = "distributed_discrete_gaussian"
#: Distributed DP keeps each client's noise at least this std (ring units): the sum-of-discrete-
#: Gaussians term tau * d of Kairouz et al. (Prop. 14) is then below 1e-300, 0 in double precision.
MIN_CLIENT_NOISE_STDDEV = 10.0
#: The ring holds the noisy sum within this many standard deviations of the summed noise.
NOISE_TAIL_STDDEVS = 10.0

#: One charged round as the accountant sees it: (noise multiplier z, sampling rate q or None,
#: mechanism kind: "gaussian" or "distributed_discrete_gaussian").
Event = tuple[float, float | None, str]


# -- the secret --------------------------------------------------------------------------------


def new_noise_key() -> str:
    """A fresh noise key, hex: 32 bytes from the OS's CSPRNG."""
    return secrets.token_hex(KEY_BYTES)


def parse_noise_key(text: str | None, *, source: str = KEY_ENVIRONMENT) -> bytes:
    """The key from its hex form; :class:`ConfigError` says what is wrong (never the value)."""
    if not text:
        raise ConfigError(
            f"differential privacy needs the server's secret noise key and {source} is not set: store 64 hex "
            "digits (python -c 'import secrets; print(secrets.token_hex(32))') in the Airflow connection named "
            "by [privacy] key_connection, or in the FEDBUCKET_DP_KEY environment variable; never in the bucket"
        )
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ConfigError(f"{source} is not hex: it must be 64 hex digits (32 random bytes)") from None
    if len(key) < KEY_BYTES:
        raise ConfigError(f"{source} holds {len(key)} bytes; the noise key must have at least {KEY_BYTES}")
    return key


def load_noise_key(environ: Mapping[str, str] | None = None, *, secret: str | None = None) -> bytes:
    """The key from ``FEDBUCKET_DP_KEY``, else from the Secret Manager version ``secret`` (how the
    aggregation job gets it on Dataproc, where job arguments and properties are visible to anyone
    who can view the job)."""
    environ = os.environ if environ is None else environ
    if environ.get(KEY_ENVIRONMENT) or secret is None:
        return parse_noise_key(environ.get(KEY_ENVIRONMENT))
    try:
        from google.api_core.exceptions import GoogleAPIError
        from google.auth.exceptions import GoogleAuthError
        from google.cloud import secretmanager
    except ImportError:
        raise ConfigError(f"reading the noise key from {secret} needs google-cloud-secret-manager") from None
    try:
        response = secretmanager.SecretManagerServiceClient().access_secret_version(name=secret)
    except (GoogleAPIError, GoogleAuthError) as exc:
        raise ConfigError(f"could not read the noise key from {secret}: {exc}") from None
    return parse_noise_key(response.payload.data.decode(), source=secret)


def _hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(key)


@dataclass(frozen=True)
class RoundNoise:
    """The secret randomness of one round, derived from the server's key and the round id.

    Picklable and small: the Spark driver ships it to executors inside the aggregation plan (it
    never goes to the bucket). A round key reveals nothing about another round's noise.
    """

    key: bytes

    @classmethod
    def derive(cls, master_key: bytes, round_id: str) -> RoundNoise:
        return cls(_hkdf(master_key, b"fedbucket/dp/v1/round/" + round_id.encode()))

    def __repr__(self) -> str:  # never log the key
        return "RoundNoise(<secret>)"

    def normals(self, label: str, start: int, stop: int) -> np.ndarray:
        """Standard normals number ``start`` to ``stop - 1`` of the stream ``label`` (float64).

        Element ``i`` is Box-Muller of the two 64-bit words of AES-256-CTR counter block ``i``
        (key: HKDF of the round key and the label), so any slice can be drawn alone and equals
        the same slice of a longer draw.
        """
        key = _hkdf(self.key, b"normals/" + label.encode())
        out = np.empty(stop - start, dtype=np.float64)
        for begin in range(start, stop, _NOISE_CHUNK):
            end = min(stop, begin + _NOISE_CHUNK)
            encryptor = Cipher(algorithms.AES(key), modes.CTR(begin.to_bytes(16, "big"))).encryptor()
            words = np.frombuffer(encryptor.update(bytes(16 * (end - begin))), dtype="<u8").reshape(-1, 2)
            u1 = ((words[:, 0] >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1): log is finite
            u2 = (words[:, 1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
            out[begin - start : end - start] = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        return out

    def tensor_noise(self, tensor: str, start: int, stop: int) -> np.ndarray:
        return self.normals("tensor/" + tensor, start, stop)

    def count_noise(self) -> float:
        return float(self.normals("unclipped-count", 0, 1)[0])

    def sampled(self, client_id: str, rate: float) -> bool:
        """The round's secret Poisson draw for one client: True with probability ``rate``."""
        digest = hmac.new(_hkdf(self.key, b"sampling"), client_id.encode(), hashlib.sha256).digest()
        return (int.from_bytes(digest[:8], "big") >> 11) * 2.0**-53 < rate


# -- the mechanism -----------------------------------------------------------------------------


def round_mechanism(settings: PrivacySettings, *, min_clients: int, clip_norm: float) -> PrivacyMechanism:
    """The round's mechanism before it runs (``next_clip_norm`` = ``clip_norm`` until the count
    is known). Raises :class:`ConfigError` if the count noise leaves nothing for the updates."""
    z = settings.noise_multiplier
    denominator = settings.denominator(min_clients)
    count_stddev = count_stddev_for(settings, denominator)
    if count_stddev is None:
        update_z = z
    elif 2 * count_stddev <= z:
        raise ConfigError(
            f"clipped_count_stddev {count_stddev:g} is too small for noise_multiplier {z:g}: the pair must form "
            "one Gaussian mechanism with multiplier z, which needs 2 * clipped_count_stddev > z"
        )
    else:
        update_z = (z**-2 - (2 * count_stddev) ** -2) ** -0.5
    return PrivacyMechanism(
        noise_multiplier=z,
        update_noise_multiplier=update_z,
        clipped_count_stddev=count_stddev,
        clip_norm=clip_norm,
        denominator=denominator,
        noise_stddev=update_z * clip_norm / denominator,
        target_quantile=settings.target_quantile if settings.adaptive_clipping else None,
        clip_learning_rate=settings.clip_learning_rate if settings.adaptive_clipping else 0.0,
        next_clip_norm=clip_norm,
        sampling_rate=settings.sampling_rate,
        charged_clients=0,
    )


def count_stddev_for(settings: PrivacySettings, denominator: float) -> float | None:
    """sigma_b: the configured one, else ``max(n-bar / 20, z)`` (TFF's and Flower's 0.05 n-bar,
    raised to z for small federations so that the count costs at most a quarter of the budget's
    precision: z_delta <= 1.16 z)."""
    if not settings.adaptive_clipping:
        return None
    if settings.clipped_count_stddev is not None:
        return settings.clipped_count_stddev
    return max(denominator / 20, settings.noise_multiplier)


def adapt_clip_norm(
    mechanism: PrivacyMechanism, *, unclipped: int, participants: int, noise: float
) -> tuple[float, float | None]:
    """The next round's clip norm and the noisy unclipped share ``b`` (Andrew et al. 2021, Alg. 1).

    ``b = clamp((sum_i (1[|delta_i| <= C] - 1/2) + sigma_b * noise) / n-bar + 1/2, 0, 1)`` and
    ``C' = C * exp(-eta * (b - gamma))``: when fewer than ``gamma`` of the updates fit under C, C
    grows. ``noise`` is a standard normal from the round's secret stream.
    """
    if mechanism.target_quantile is None or mechanism.clipped_count_stddev is None:
        return mechanism.clip_norm, None
    centred = (unclipped - participants / 2) + mechanism.clipped_count_stddev * noise
    share = min(1.0, max(0.0, centred / mechanism.denominator + 0.5))
    step = -mechanism.clip_learning_rate * (share - mechanism.target_quantile)
    return mechanism.clip_norm * math.exp(step), share


# -- distributed DP under secure aggregation ----------------------------------------------------


@dataclass(frozen=True)
class DistributedNoise:
    """How a secure round with distributed DP quantises and how much noise each client adds.

    A client clips its update to L2 norm ``C``, quantises it with ``levels`` (``s = levels / 2C``
    ring units per unit) and adds discrete Gaussian noise of std ``client_stddev`` to every
    coordinate. Replacing one client's update by zero moves the quantised sum by at most
    ``sensitivity = s C + sqrt(d)`` in L2 (``d`` coordinates, each rounded). The sum of at least
    ``min_survivors`` such noises, ``client_stddev = z * sensitivity / sqrt(min_survivors)``, is
    ``rho``-zCDP with ``rho = sensitivity^2 / (2 min_survivors client_stddev^2) = 1 / (2 z^2)``
    (Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated Learning
    with Secure Aggregation", Prop. 14; its additive ``tau * d`` is 0 in double precision once
    ``client_stddev >= 10``, which is enforced). ``levels`` leaves room in the ring for the noisy sum
    of ``max_clients`` within ``NOISE_TAIL_STDDEVS`` standard deviations on either side.
    """

    levels: int
    client_stddev: float
    sensitivity: float
    min_survivors: int


def distributed_noise(
    *, noise_multiplier: float, clip_norm: float, dimension: int, max_clients: int, min_survivors: int
) -> DistributedNoise:
    """Size the quantisation and each client's noise (see :class:`DistributedNoise`)."""
    if not 3 <= min_survivors <= max_clients:
        raise ConfigError(f"min_survivors {min_survivors} must be between 3 and max_clients {max_clients}")
    spread = NOISE_TAIL_STDDEVS * noise_multiplier * math.sqrt(max_clients / min_survivors)
    root_d = math.sqrt(dimension)
    levels = ring_levels(max_clients, headroom_per_level=spread / 2, headroom=spread * root_d)
    sensitivity = levels / 2 + root_d
    client_stddev = noise_multiplier * sensitivity / math.sqrt(min_survivors)
    if client_stddev < MIN_CLIENT_NOISE_STDDEV:
        raise ConfigError(
            f"each client's noise would be {client_stddev:.3g} ring units, below {MIN_CLIENT_NOISE_STDDEV}"
        )
    return DistributedNoise(levels, client_stddev, sensitivity, min_survivors)


def distributed_mechanism(
    noise_multiplier: float, *, clip_norm: float, levels: int, client_stddev: float, survivors: int
) -> PrivacyMechanism:
    """The mechanism of a distributed round as it ran: ``survivors`` noisy inputs summed, divided by
    their number (public under secure aggregation: the roster). ``noise_multiplier`` is the one the
    round's task sized the clients' noise for, whatever the settings say now."""
    summed_stddev = math.sqrt(survivors) * client_stddev  # ring units
    scale = levels / (2 * clip_norm)
    return PrivacyMechanism(
        kind=DISTRIBUTED,
        noise_multiplier=noise_multiplier,
        update_noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        denominator=survivors,
        noise_stddev=summed_stddev / scale / survivors,
        next_clip_norm=clip_norm,
        charged_clients=0,
    )


# -- the accountant ----------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _epsilon(history: tuple[tuple[Event, int], ...], delta: float) -> float:
    if not history:
        return 0.0
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    distributed = any(kind == DISTRIBUTED for (_, _, kind), _ in history)
    accountant: dp_accounting.PrivacyAccountant = (
        rdp_privacy_accountant.RdpAccountant() if distributed else pld_privacy_accountant.PLDAccountant()
    )
    for (z, q, kind), count in history:
        # a distributed round is rho-zCDP with rho = 1 / (2 z^2) (Kairouz et al. 2021, Prop. 14; its
        # xi = tau * d term is 0 in double precision at the noise sizes allowed, see distributed_noise)
        event: dp_accounting.DpEvent = (
            dp_accounting.ZCDpEvent(rho=1 / (2 * z * z)) if kind == DISTRIBUTED else dp_accounting.GaussianDpEvent(z)
        )
        if q is not None:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        accountant.compose(event, count)
    return float(accountant.get_epsilon(delta))


def epsilon(history: Mapping[Event, int], delta: float) -> float:
    """The epsilon at ``delta`` of the rounds in ``history`` ((z, q, kind) -> rounds), composed by
    dp-accounting's PLD accountant (its RDP accountant once a distributed round is in the history).
    Histories repeat across clients, so results are cached."""
    return _epsilon(tuple(sorted((k, v) for k, v in history.items() if v)), delta)


def accountant_for(histories: Iterable[Mapping[Event, int]]) -> str:
    return RDP_ACCOUNTANT if any(kind == DISTRIBUTED for h in histories for (_, _, kind) in h) else ACCOUNTANT


def event_of(mechanism: PrivacyMechanism) -> Event:
    return (mechanism.noise_multiplier, mechanism.sampling_rate, mechanism.kind)


def planned_event(settings: PrivacySettings, *, distributed: bool) -> Event:
    """The event a round with ``settings`` will be charged (before it runs)."""
    return (settings.noise_multiplier, None if distributed else settings.sampling_rate,
            DISTRIBUTED if distributed else "gaussian")  # fmt: skip


def client_histories(ledger: PrivacyLedger, *, excluding: str | None = None) -> dict[str, Counter[Event]]:
    """Each client's charged rounds, by mechanism."""
    histories: dict[str, Counter[Event]] = {}
    for entry in ledger.rounds:
        if entry.round_id == excluding:
            continue
        event = event_of(entry.privacy.mechanism)
        for client in entry.clients:
            histories.setdefault(client, Counter())[event] += 1
    return histories


def _with(history: Counter[Event], event: Event) -> Counter[Event]:
    out = Counter(history)
    out[event] += 1
    return out


def worst_case_after(
    histories: Mapping[str, Counter[Event]], event: Event, *, cap: int, delta: float
) -> tuple[float, str | None]:
    """The largest epsilon any client could reach if charged for one more round ``event``: over
    the clients still under the cap (the others' updates are refused) and a client new to the
    federation. Returns (epsilon, one such client id, or None for a new client)."""
    worst, who = epsilon(Counter({event: 1}), delta), None
    seen: set[tuple[tuple[Event, int], ...]] = set()
    for client, history in sorted(histories.items()):
        key = tuple(sorted(history.items()))
        if sum(history.values()) >= cap or key in seen:
            continue
        seen.add(key)
        value = epsilon(_with(history, event), delta)
        if value > worst:
            worst, who = value, client
    return worst, who


def spent(ledger: PrivacyLedger, settings: PrivacySettings) -> PrivacySpent:
    """The federation's privacy loss so far: the worst client's epsilon over its charged rounds."""
    histories = client_histories(ledger)
    worst = max((epsilon(h, settings.delta) for h in _distinct(histories.values())), default=0.0)
    return PrivacySpent(
        epsilon=worst,
        delta=settings.delta,
        accountant=accountant_for(histories.values()),
        budget=settings.epsilon_budget,
        rounds=len(ledger.rounds),
        most_rounds_per_client=max((sum(h.values()) for h in histories.values()), default=0),
        max_participations=settings.max_participations,
    )


def _distinct(histories: Iterable[Counter[Event]]) -> list[Counter[Event]]:
    unique = {tuple(sorted(h.items())): h for h in histories}
    return list(unique.values())


def rounds_within_budget(event: Event, settings: PrivacySettings) -> int:
    """How many rounds of ``event`` one client can take part in before its epsilon passes the budget."""
    rounds = 0
    while rounds < settings.max_participations and epsilon(Counter({event: rounds + 1}), settings.delta) <= (
        settings.epsilon_budget
    ):
        rounds += 1
    return rounds


# -- the ledger --------------------------------------------------------------------------------


def read_ledger(store: ObjectStore, *, layout: BucketLayout = LAYOUT) -> tuple[PrivacyLedger, int]:
    """The ledger and its generation (0: none yet, an empty ledger)."""
    ledger, generation = read_optional(store, layout.privacy_ledger, PrivacyLedger, max_bytes=MAX_LEDGER_BYTES)
    return (ledger or PrivacyLedger()), generation


def capped_clients(store: ObjectStore, settings: PrivacySettings, *, layout: BucketLayout = LAYOUT) -> set[str]:
    """Clients already charged for ``max_participations`` rounds: their updates must stay out."""
    ledger, _ = read_ledger(store, layout=layout)
    return {c for c, h in client_histories(ledger).items() if sum(h.values()) >= settings.max_participations}


def clip_norm_for(ledger: PrivacyLedger, round_id: str, settings: PrivacySettings) -> float:
    """The clip norm a round uses: the one it was charged with (a re-run), else the last charged
    round's ``next_clip_norm``, else the configured initial one. With a fixed clip (no
    ``adaptive_clipping``) always the configured one."""
    if not settings.adaptive_clipping:
        return settings.clip_norm
    for entry in ledger.rounds:
        if entry.round_id == round_id:
            return entry.privacy.mechanism.clip_norm
    return ledger.rounds[-1].privacy.mechanism.next_clip_norm if ledger.rounds else settings.clip_norm


def check_budget(
    store: ObjectStore,
    round_id: str,
    settings: PrivacySettings,
    *,
    distributed: bool = False,
    layout: BucketLayout = LAYOUT,
) -> PrivacySpent | None:
    """The publish step's guard. Raises :class:`PrivacyBudgetExceeded` if some client could end
    this round with an epsilon above the budget, and :class:`ConfigError` for a round without dp
    in a federation that has charged rounds (its model would carry no guarantee). Returns the
    federation's spending so far (None without dp). A round already charged passes (a re-run)."""
    ledger, _ = read_ledger(store, layout=layout)
    if not settings.dp:
        if ledger.rounds:
            raise ConfigError(
                f"this federation has been differentially private since round {ledger.rounds[0].round_id} "
                f"({len(ledger.rounds)} charged round(s)): a round without dp would release a model with no "
                "guarantee; keep [privacy] dp = true"
            )
        return None
    so_far = spent(ledger, settings)
    if any(entry.round_id == round_id for entry in ledger.rounds):
        return so_far
    event = planned_event(settings, distributed=distributed)
    worst, who = worst_case_after(
        client_histories(ledger), event, cap=settings.max_participations, delta=settings.delta
    )
    if worst > settings.epsilon_budget:
        raise PrivacyBudgetExceeded(
            f"round {round_id} would bring {'client ' + who if who else 'a new client'} to epsilon {worst:.3f} at "
            f"delta {settings.delta:g}, over the budget of {settings.epsilon_budget:g} by "
            f"{worst - settings.epsilon_budget:.3f}: {_budget_hint(event, settings)}, or accept that the federation "
            "has spent its budget (raising epsilon_budget weakens what was promised)"
        )
    return so_far


def _budget_hint(event: Event, settings: PrivacySettings) -> str:
    affordable = rounds_within_budget(event, settings)
    z = f"noise_multiplier {settings.noise_multiplier:g}"
    if affordable == 0:
        return f"one round at {z} already costs more than the budget: raise noise_multiplier"
    if affordable < settings.max_participations:
        return (
            f"at {z} one client can take part in {affordable} round(s) within the budget: set [privacy] "
            f"max_participations to at most {affordable} (it is {settings.max_participations}) so that clients at "
            "the cap are refused instead, or raise noise_multiplier"
        )
    return f"that client's earlier rounds (at other noise multipliers) leave no room for one at {z}: raise it"


def charge_round(
    store: ObjectStore,
    round_id: str,
    mechanism: PrivacyMechanism,
    clients: Iterable[str],
    settings: PrivacySettings,
    *,
    ledger: PrivacyLedger,
    generation: int,
    layout: BucketLayout = LAYOUT,
) -> RoundPrivacy:
    """Record the round in ``ledger`` (read at ``generation`` when the round's admissions were
    decided) and return what it spent. A re-run replaces its entry in place (the order of rounds
    is the order they were first charged: the next clip norm comes from the last one).

    Raises :class:`PrivacyBudgetExceeded`, writing nothing, if a charged client would pass the
    budget (the publish step's check makes this unreachable unless settings changed in between),
    and :class:`~fedbucket.protocol.errors.PreconditionFailed` if the ledger changed since it was
    read (compare-and-swap: a concurrent writer makes this fail, never lose a charge)."""
    charged = sorted(set(clients))
    mechanism = mechanism.model_copy(update={"charged_clients": len(charged)})
    entry = LedgerRound(
        round_id=round_id,
        charged_at=utcnow(),
        privacy=RoundPrivacy(mechanism=mechanism, spent=spent(ledger, settings)),  # provisional
        clients=charged,
    )
    rounds = list(ledger.rounds)
    at = next((i for i, e in enumerate(rounds) if e.round_id == round_id), None)
    if at is None:
        rounds.append(entry)
    else:
        rounds[at] = entry
    updated = PrivacyLedger(rounds=rounds)
    histories = client_histories(updated)
    over = {c: epsilon(histories[c], settings.delta) for c in charged}
    over = {c: e for c, e in over.items() if e > settings.epsilon_budget}
    if over:
        client, value = max(over.items(), key=lambda item: item[1])
        raise PrivacyBudgetExceeded(
            f"round {round_id} would take {len(over)} client(s) past the budget of {settings.epsilon_budget:g} "
            f"(client {client} to epsilon {value:.3f}): nothing was charged or written"
        )
    privacy = RoundPrivacy(mechanism=mechanism, spent=spent(updated, settings))
    rounds[rounds.index(entry)] = entry.model_copy(update={"privacy": privacy})
    write_document(store, layout.privacy_ledger, PrivacyLedger(rounds=rounds), if_generation_match=generation)
    return privacy


def public_privacy(privacy: RoundPrivacy, settings: PrivacySettings) -> dict[str, object]:
    """What a model manifest (read by every client) may say about the round's privacy: the
    mechanism without the charged count, and the guarantee as the budget the federation enforces.

    The exact epsilon spent and the number of clients charged depend on who took part (one client
    more or less changes them), so they stay in the server-only reports and ledger."""
    mechanism = privacy.mechanism.model_dump(mode="json", exclude={"charged_clients"})
    return {
        "mechanism": mechanism,
        "guarantee": {
            "epsilon_at_most": settings.epsilon_budget,
            "delta": settings.delta,
            "accountant": RDP_ACCOUNTANT if privacy.mechanism.kind == DISTRIBUTED else ACCOUNTANT,
            "max_participations": settings.max_participations,
        },
    }
