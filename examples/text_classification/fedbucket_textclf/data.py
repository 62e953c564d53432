"""Data: a client's CSV of messages -> :class:`~fedbucket.torch.task.Examples`, and a synthetic
chat corpus for simulations and the central baseline.

CSV format (UTF-8, a BOM is tolerated): a header row naming at least the columns ``text`` and
``label`` (other columns are ignored), then one message per row; ``label`` is ``0`` (not offensive)
or ``1`` (offensive). Quoted fields may span lines.

Invariants:

- Every client, the server's hold-out split and the central baseline tokenize with the one
  :data:`TOKENIZER` below, whose ``buckets`` is the model's default: its ids are what the
  federation's split files hold, so changing it needs a new federation.
- :func:`generate_corpus` is a pure function of ``(n, seed)`` and the generator's parameters.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from fedbucket.protocol.errors import ConfigError
from fedbucket.torch.task import Examples
from fedbucket_textclf.tokenizer import HashingTokenizer

#: Hash buckets of the tokenizer, and the default ``buckets`` of the model.
BUCKETS = 16384
#: Ids per message: words and bigrams of the first ~32 words (chat messages are shorter).
MAX_TOKENS = 64
#: The tokenizer of this task. Do not change it under a running federation (module doc).
TOKENIZER = HashingTokenizer(buckets=BUCKETS, max_tokens=MAX_TOKENS)

#: Class ids: index = label.
LABELS = ("not_offensive", "offensive")

Row = tuple[str, int]


def examples_from_rows(rows: Iterable[Row], tokenizer: HashingTokenizer = TOKENIZER) -> Examples:
    """Tokenize ``(text, label)`` rows into examples."""
    rows = list(rows)
    x = tokenizer.encode(text for text, _ in rows)
    y = np.fromiter((label for _, label in rows), dtype=np.int64, count=len(rows))
    return Examples(x, y)


def read_rows(path: str | os.PathLike[str]) -> list[Row]:
    """The ``(text, label)`` rows of a CSV file (module doc); a bad row is a :class:`ConfigError`
    (a ``ValueError``) that names its line."""
    rows: list[Row] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as fp:
            reader = csv.reader(fp)
            header = next(reader, None)
            if header is None:
                raise ConfigError(f"{path}: empty file; expected a header row with columns text,label")
            names = [name.strip().lower() for name in header]
            if "text" not in names or "label" not in names:
                raise ConfigError(f"{path}:1: header {header} must name the columns text and label")
            text_at, label_at = names.index("text"), names.index("label")
            for record in reader:
                if not record:  # csv yields [] for a blank line; a trailing newline is no error
                    continue
                # reader.line_num is the line the record *ends* on: right for one-line records and
                # the closest the csv module gives for quoted multi-line ones.
                where = f"{path}:{reader.line_num}"
                if len(record) != len(header):
                    raise ConfigError(f"{where}: {len(record)} fields, the header has {len(header)}")
                label = record[label_at].strip()
                if label not in ("0", "1"):
                    raise ConfigError(f"{where}: label must be 0 (not offensive) or 1 (offensive), got {label!r}")
                rows.append((record[text_at], int(label)))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise ConfigError(f"{path}: malformed CSV ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not rows:
        # A client with no examples cannot train (its metrics would be NaN): say so up front.
        raise ConfigError(f"{path}: no messages after the header")
    return rows


def read_csv(source: str | os.PathLike[str]) -> Examples:
    """A client's data (``Task.load_data``): the messages of a CSV file, tokenized."""
    return examples_from_rows(read_rows(source))


def write_csv(rows: Iterable[Row], path: str | os.PathLike[str]) -> None:
    """Write ``(text, label)`` rows as a CSV file :func:`read_csv` reads back unchanged."""
    with open(path, "w", encoding="utf-8", newline="") as fp:
        writer = csv.writer(fp)
        writer.writerow(["text", "label"])
        writer.writerows((text, int(label)) for text, label in rows)


# --- the synthetic corpus --------------------------------------------------------------------
#
# Chat messages with a learnable but not trivial labelling:
# - most offensive messages share their frame with friendly ones ("you are such a legend" /
#   "you are such a clown"): the label is in the slot word, so a model must learn the words, not
#   the template;
# - the insult words also occur in messages that are not offensive (a stupid bus, "i'm such an
#   idiot", "shut up, no way!", a game boss that is trash), and friendly banter wraps a real
#   insult ("you absolute muppet, love you"): context words matter;
# - slot words come from long-tailed lists and are sometimes misspelt ("1d10t", "legeeend"), so
#   some messages hinge on a word seen rarely or never in training: more data keeps helping;
# - a fraction of labels is flipped (annotators disagree), which caps the reachable accuracy.

_NAMES = ("sam", "alex", "jo", "priya", "marco", "lena", "tom", "kim", "ravi", "nina", "omar", "zoe", "ben", "mia")
_INSULTS = (  # mild placeholders, most frequent first (drawn Zipf-like)
    "idiot", "loser", "clown", "moron", "fool", "jerk", "muppet", "creep", "dork", "nitwit", "dimwit",
    "numpty", "halfwit", "buffoon", "donkey", "goblin", "weirdo", "nobody", "bozo", "twit", "airhead",
    "blockhead", "bonehead", "clot", "dingbat", "dolt", "dunce", "knucklehead", "lamebrain", "nincompoop",
    "pillock", "plonker", "prat", "simpleton", "wally", "git", "ninny", "oaf", "pinhead", "chump",
)  # fmt: skip
_PRAISE = (  # the friendly counterparts of the insults, same slots
    "legend", "star", "genius", "hero", "champ", "pro", "gem", "sweetheart", "angel", "wizard", "rockstar",
    "lifesaver", "beast", "boss", "natural", "sport", "darling", "treasure", "superstar", "machine",
    "trooper", "diamond", "pal", "ace", "whiz", "mastermind", "saint", "sunshine", "king", "queen",
)  # fmt: skip
_BAD_ADJECTIVES = (
    "stupid", "dumb", "useless", "pathetic", "annoying", "clueless", "worthless", "brainless", "hopeless",
    "spineless", "gormless", "witless",
)  # fmt: skip
_GOOD_ADJECTIVES = (
    "brilliant", "kind", "funny", "amazing", "clever", "lovely", "awesome", "generous", "patient", "smart",
    "talented", "thoughtful",
)  # fmt: skip
_THINGS = ("bus", "printer", "wifi", "app", "update", "laptop", "weather", "train", "meeting", "alarm", "router")
_THING_PROBLEMS = (
    "is late again", "keeps crashing", "won't connect", "ruined my morning", "broke again", "is so slow today",
    "just deleted my work", "won't stop beeping", "got cancelled", "made me miss the start",
)  # fmt: skip
_MISHAPS = (
    "i left my keys at home", "i forgot the tickets", "i sent that to the wrong chat", "i missed my stop",
    "i burnt the toast again", "i locked myself out", "i forgot it was my turn", "i deleted the wrong file",
)  # fmt: skip
_EVENTS = ("lunch", "the match", "movie night", "the meeting", "practice", "the party", "dinner", "the raid")
_WHEN = ("today", "tomorrow", "tonight", "at 6", "on friday", "this weekend", "later", "after class")
_GOOD_NEWS = (
    "you got the job", "we won", "that's amazing", "you actually finished it", "the tickets are free",
    "she said yes", "you passed", "it worked first time",
)  # fmt: skip
_BANTER = ("love you", "jk", "see you at practice", "haha miss you", "but you're my favourite", "never change")
_FILLERS = ("lol", "tbh", "honestly", "bro", "omg", "haha", "ok", "srsly", "ngl", "mate")
_GAME_THINGS = ("aim", "boss", "loot", "team", "build", "gear", "map", "lag")

# Frames shared by both classes: {noun} and {adj} are praise for label 0 and insults for label 1.
_SHARED_TEMPLATES = (
    (6, "you are such a {noun}"),
    (5, "you're a {adj} {noun}, {name}"),
    (4, "{name} is a {adj} {noun}"),
    (3, "lol {name} you absolute {noun}"),
    (3, "you play like a {noun}"),
    (3, "what a {noun}, {name}"),
    (3, "honestly you are so {adj}"),
    (2, "{name} you {adj} {noun}, that was something"),
)
# Messages that are not offensive, several with the offensive vocabulary not aimed at anyone.
_NEUTRAL_TEMPLATES = (
    (6, "hey {name}, are we still on for {event} {when}?"),
    (5, "can you send me the notes from {event} {when}"),
    (4, "running {minutes} minutes late, sorry {name}"),
    (5, "thanks {name}, that was really helpful"),
    (4, "good game everyone, see you {when}"),
    (3, "who is bringing snacks to {event}?"),
    (3, "i think {name} already booked a table for {event}"),
    (2, "happy birthday {name}! have a great day"),
    (2, "did anyone see the score from {event}"),
    (5, "this {bad_adj} {thing} {thing_problem}"),
    (3, "the {thing} {thing_problem}, so {bad_adj}"),
    (3, "ugh my {thing} is trash, {thing_problem}"),
    (4, "i'm such an {insult}, {mishap}"),
    (3, "i feel so {bad_adj} today, {mishap}"),
    (2, "what an {insult} i am, {mishap}"),
    (3, "shut up, {good_news}!"),
    (2, "shut up no way, {good_news}"),
    (3, "my {game_thing} is trash today, need more practice"),
    (2, "that boss is {bad_adj}, we need better gear"),
    (2, "the villain in that movie kept calling everyone a {insult} lol"),
    (1, "don't call yourself an {insult}, {name}, you did great"),
    (1, "nobody is a {insult} for asking questions here"),
)
_OFFENSIVE_TEMPLATES = (
    (4, "shut up {name}, nobody asked"),
    (3, "shut up you {insult}"),
    (3, "nobody cares what you think, {insult}"),
    (3, "get lost {insult}"),
    (3, "go away you {bad_adj} {insult}"),
    (2, "your {game_thing} is trash just like you"),
    (2, "are you {bad_adj} or something?"),
    (2, "how can anyone be this {bad_adj}, {name}"),
    (2, "nobody wants you here {name}"),
    (1, "just leave already, {name}"),
)
# How a label's messages are made: (weight, kind). "banter" is an insulting shared frame with a
# friendly ending ("you absolute muppet, love you"): labelled not offensive.
_KINDS = {
    0: ((78, "own"), (15, "shared"), (7, "banter")),
    1: ((45, "own"), (55, "shared")),
}

_ARTICLE = re.compile(r"\ban? ([a-z0-9])")

# Leetspeak substitutions used to misspell words (as people dodging a word filter do).
_LEET = {"i": "1", "o": "0", "e": "3", "a": "4", "s": "5", "t": "7"}


def _weighted(rng: np.random.Generator, table: Sequence[tuple[int, str]]) -> str:
    weights = np.array([w for w, _ in table], dtype=float)
    return table[rng.choice(len(table), p=weights / weights.sum())][1]


def _choose(rng: np.random.Generator, items: Sequence[str], zipf: float = 0.0) -> str:
    """One of ``items``; with ``zipf > 0`` item ``k`` has weight ``1 / (k + 1) ** zipf``."""
    if zipf <= 0:
        return items[rng.integers(len(items))]
    weights = 1.0 / np.arange(1, len(items) + 1) ** zipf
    return items[rng.choice(len(items), p=weights / weights.sum())]


def _misspell(rng: np.random.Generator, word: str) -> str:
    if rng.random() < 0.5:  # leetspeak: replace each replaceable letter with probability 1/2
        return "".join(_LEET[c] if c in _LEET and rng.random() < 0.5 else c for c in word)
    vowels = [i for i, c in enumerate(word) if c in "aeiou"]
    if not vowels:
        return word + word[-1] * 2
    i = vowels[rng.integers(len(vowels))]
    return word[:i] + word[i] * int(rng.integers(2, 5)) + word[i:]  # stretch a vowel: "looooser"


def _fill(rng: np.random.Generator, template: str, *, hostile: bool, misspell: float) -> str:
    def word(items: Sequence[str], zipf: float) -> str:
        chosen = _choose(rng, items, zipf)
        return _misspell(rng, chosen) if rng.random() < misspell else chosen

    insult, bad_adj = word(_INSULTS, 1.0), word(_BAD_ADJECTIVES, 0.8)
    values = {
        "name": _choose(rng, _NAMES),
        "insult": insult,
        "bad_adj": bad_adj,
        "noun": insult if hostile else word(_PRAISE, 1.0),
        "adj": bad_adj if hostile else word(_GOOD_ADJECTIVES, 0.8),
        "thing": _choose(rng, _THINGS),
        "thing_problem": _choose(rng, _THING_PROBLEMS),
        "mishap": _choose(rng, _MISHAPS),
        "event": _choose(rng, _EVENTS),
        "when": _choose(rng, _WHEN),
        "good_news": _choose(rng, _GOOD_NEWS),
        "game_thing": _choose(rng, _GAME_THINGS),
        "minutes": str(int(rng.integers(2, 30))),
    }
    # Templates write "a"/"an" before a drawn word; fix the article to the word actually drawn.
    return _ARTICLE.sub(lambda m: ("an " if m[1] in "aeiou" else "a ") + m[1], template.format(**values))


def _message(rng: np.random.Generator, label: int, *, misspell: float) -> str:
    kind = _weighted(rng, _KINDS[label])
    if kind == "shared":
        text = _fill(rng, _weighted(rng, _SHARED_TEMPLATES), hostile=label == 1, misspell=misspell)
    elif kind == "banter":
        text = _fill(rng, _weighted(rng, _SHARED_TEMPLATES), hostile=True, misspell=misspell)
        text = f"{text}, {_choose(rng, _BANTER)}"
    else:
        own = _OFFENSIVE_TEMPLATES if label == 1 else _NEUTRAL_TEMPLATES
        text = _fill(rng, _weighted(rng, own), hostile=label == 1, misspell=misspell)
    if rng.random() < 0.3:  # chat noise around the message
        filler = _choose(rng, _FILLERS)
        text = f"{filler} {text}" if rng.random() < 0.5 else f"{text} {filler}"
    if rng.random() < 0.15:
        text = text.upper() if rng.random() < 0.3 else text.capitalize()
    return text


def generate_corpus(
    n: int,
    seed: int,
    path: str | os.PathLike[str] | None = None,
    *,
    offensive_fraction: float = 0.2,
    label_noise: float = 0.05,
    misspell: float = 0.15,
) -> list[Row]:
    """``n`` synthetic chat messages ``(text, label)``, the same for the same arguments; also
    written to ``path`` as CSV when given.

    ``offensive_fraction`` is the expected fraction of rows *labelled* offensive, after
    ``label_noise`` (the fraction of labels flipped at random; it bounds the accuracy any model
    can reach at about ``1 - label_noise``). ``misspell`` is the probability that a slot word
    (insult, praise, adjective) is misspelt. Seeded with numpy's ``default_rng``: data, not secrets.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    if not 0 <= label_noise < 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5); got {label_noise}")
    if not label_noise <= offensive_fraction <= 1 - label_noise:
        raise ValueError(f"offensive_fraction must be in [label_noise, 1 - label_noise]; got {offensive_fraction}")
    if not 0 <= misspell <= 1:
        raise ValueError(f"misspell must be in [0, 1]; got {misspell}")
    # P(labelled 1) = p (1 - noise) + (1 - p) noise = offensive_fraction  =>  solve for p.
    clean_fraction = (offensive_fraction - label_noise) / (1 - 2 * label_noise)
    rng = np.random.default_rng(seed)
    rows: list[Row] = []
    for _ in range(n):
        label = int(rng.random() < clean_fraction)
        text = _message(rng, label, misspell=misspell)
        if rng.random() < label_noise:
            label = 1 - label
        rows.append((text, label))
    if path is not None:
        write_csv(rows, path)
    return rows
