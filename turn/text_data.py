"""The data recipe for the text end-of-turn model: deterministic, shared by training and eval.

Labels: 0 continue (mid-utterance), 1 end (a complete turn), 2 stop (a stop / wait request).

- Topical-Chat (shared/data/topical-chat): every turn whole is "end"; the same turn cut at a
  word boundary is "continue". A cut right after sentence-final punctuation (. ? ! …) is skipped:
  the speaker may well have stopped there, so calling it incomplete would teach noise.
  valid_freq is the only file training sees; test_freq is for the held-out report only.
- chitchat-dataset 0.9.0 (PyPI, MIT; its wheel carries dataset.json): typed conversations in
  which a turn is a run of messages by one speaker. The whole run is "end" (the speaker
  changed) and cuts inside a message are "continue", as above. Boundaries between two messages
  of one run ("holds") are skipped: a typed message that the same person followed up is often
  a complete sentence, so they are ambiguous rather than incomplete.
- Stop phrases written here, with fillers, repeats, casing and punctuation. A separate held-out
  list of other wordings is for evaluation only and never reaches training.

The recipe's labels have a ceiling: a cut can land where a sentence could have ended ("He was
cut around christmas" from a longer turn) and, with its punctuation stripped, reads as complete;
no text model separates those from whole turns, so high incomplete accuracy costs recall on
whole turns that lost their final punctuation.

Stop wordings come in three disjoint lists: training (STOP_CORES with variants), validation
(VALIDATION_STOP, picks the stop threshold) and held-out (HELDOUT_STOP, the report only).

Every text then gets the same ASR-style mix whatever its label (so style carries no label):
lowercased with p=0.3; punctuation kept (0.6), only the final punctuation stripped (0.2) or all
punctuation stripped (0.2), as a streaming recogniser's partials may lack them.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from voice.corpora import TOPICAL_DIR, topical_chat
from voice.settings import Settings

CONTINUE, END, STOP = 0, 1, 2
CHITCHAT_PIN = "chitchat-dataset==0.9.0"
SEED = 1234

LOWERCASE_P = 0.3
PUNCT_MODES = (("keep", 0.6), ("strip_final", 0.2), ("strip_all", 0.2))

_CLOSERS = "\"')]”’*"
_SENTENCE_END = (".", "?", "!", "…")
_QUOTE_EDGE = re.compile(r"(?<!\w)'|'(?!\w)")


class DataMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    last_assistant: str | None
    source: str  # "topical", "chitchat", "stop", "not-stop"


def clean(text: str) -> str:
    return " ".join(text.split())


def strip_final_punctuation(text: str) -> str:
    stripped = re.sub(r"[^\w]+$", "", text)
    return stripped or text


def strip_all_punctuation(text: str) -> str:
    text = re.sub(r"[^\w\s']", " ", text.replace("’", "'"))
    return clean(_QUOTE_EDGE.sub(" ", text)) or text


def asr_style(text: str, rng: random.Random) -> str:
    """One draw of the ASR-style mix (see the module doc)."""
    if rng.random() < LOWERCASE_P:
        text = text.lower()
    mode = rng.choices([m for m, _ in PUNCT_MODES], [p for _, p in PUNCT_MODES])[0]
    if mode == "strip_final":
        return strip_final_punctuation(text)
    if mode == "strip_all":
        return strip_all_punctuation(text)
    return text


def _ends_sentence(word: str) -> bool:
    return word.rstrip(_CLOSERS).endswith(_SENTENCE_END)


def cut_points(words: list[str], forbidden: frozenset[int] = frozenset()) -> list[int]:
    """Word counts k (0 < k < len) at which words[:k] is a genuine mid-turn point."""
    # A prefix needs at least one real word ("-" alone is no utterance).
    first = next((i for i, w in enumerate(words) if any(c.isalnum() for c in w)), len(words))
    return [
        k
        for k in range(first + 1, len(words))
        if k not in forbidden and not _ends_sentence(words[k - 1])
    ]


def turn_examples(
    words: list[str],
    rng: random.Random,
    source: str,
    last: str | None,
    cuts: int,
    copies: int = 1,
    forbidden: frozenset[int] = frozenset(),
) -> Iterator[Example]:
    """``copies`` styled copies of the whole turn ("end") and up to ``cuts`` distinct cuts."""
    whole = " ".join(words)
    for _ in range(copies):
        yield Example(asr_style(whole, rng), END, last, source)
    points = cut_points(words, forbidden)
    for k in sorted(rng.sample(points, min(cuts, len(points)))):
        yield Example(asr_style(" ".join(words[:k]), rng), CONTINUE, last, source)


def _conversation_rng(seed: int, conversation: str) -> random.Random:
    # One generator per conversation: a subset of conversations gets the same examples.
    return random.Random(f"{seed}:{conversation}")


def load_topical(name: str, folder: Path = TOPICAL_DIR) -> dict[str, list[str]]:
    """Conversation id -> its cleaned messages in order ("valid_freq" or "test_freq")."""
    return {
        cid: [m for m in (clean(t["message"]) for t in turns) if m]
        for cid, turns in topical_chat(name, folder).items()
    }


def topical_examples(
    conversations: dict[str, list[str]], seed: int, cuts: int, copies: int = 1
) -> list[Example]:
    out: list[Example] = []
    for cid, messages in conversations.items():
        rng = _conversation_rng(seed, cid)
        for i, message in enumerate(messages):
            last = messages[i - 1] if i else None
            out += turn_examples(message.split(), rng, "topical", last, cuts, copies)
    return out


def chitchat_file(cache_dir: Path | None = None) -> Path:
    """The chitchat-dataset wheel, fetched once with pip into the cache (never at run time)."""
    folder = (cache_dir or Settings().models.cache_dir) / "data"
    found = sorted(folder.glob("chitchat_dataset-0.9.0-*.whl"))
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        subprocess.run([*command, "-d", str(folder), CHITCHAT_PIN], check=True)
        found = sorted(folder.glob("chitchat_dataset-0.9.0-*.whl"))
    if not found:
        raise DataMissing(f"pip download {CHITCHAT_PIN} left no wheel in {folder}")
    return found[0]


def load_chitchat(wheel: Path) -> dict[str, list[list[str]]]:
    """Conversation id -> turns, each turn the list of one speaker's consecutive messages."""
    with zipfile.ZipFile(wheel) as archive:
        data = json.loads(archive.read("chitchat_dataset/dataset.json"))
    out: dict[str, list[list[str]]] = {}
    for cid, conv in sorted(data.items()):
        turns = [[m for m in (clean(u["text"]) for u in turn) if m] for turn in conv["messages"]]
        out[cid] = [t for t in turns if t]
    return out


def chitchat_examples(
    conversations: dict[str, list[list[str]]], seed: int, cuts: int
) -> list[Example]:
    out: list[Example] = []
    for cid, turns in conversations.items():
        rng = _conversation_rng(seed, cid)
        for i, messages in enumerate(turns):
            words: list[str] = []
            holds: set[int] = set()
            for message in messages:
                if words:
                    holds.add(len(words))
                words += message.split()
            last = " ".join(turns[i - 1]) if i else None
            out += turn_examples(words, rng, "chitchat", last, cuts, forbidden=frozenset(holds))
    return out


# Stop requests for training: cores, and the fillers and tails that vary them.
STOP_CORES = (
    "stop", "stop talking", "stop it", "stop that", "just stop", "please stop", "stop please",
    "stop stop", "okay stop", "stop right now", "stop talking please", "can you stop",
    "can you stop talking", "could you stop talking", "wait", "wait wait", "wait a second",
    "wait a sec", "wait a minute", "wait a moment", "wait hold on", "hold on", "hold on hold on",
    "hold on a second", "hold on a sec", "hold on a minute", "hold up", "shh", "shhh", "shush",
    "hush", "be quiet", "quiet", "quiet please", "please be quiet", "be quiet for a second",
    "silence", "one sec", "one second", "one moment", "just a moment", "just a second",
    "give me a second", "give me a minute", "hang on", "hang on a second", "hang on a sec",
    "let me think", "let me think about it", "let me think about that", "never mind",
    "nevermind", "forget it", "that's enough", "enough", "okay that's enough", "pause",
    "shut up", "let me speak", "let me talk", "no stop", "sorry wait", "stop for a moment",
)  # fmt: skip
STOP_PREFIXES = (
    "", "", "", "okay", "ok", "oh", "um", "uh", "no", "hey", "sorry", "actually", "yeah", "so",
    "alright", "no no", "hmm",
)  # fmt: skip
STOP_SUFFIXES = ("", "", "", "please", "now", "for a sec", "a second", "already", "okay")
# Requests built around a core: "Could you stop talking?", "I need you to hold on."
STOP_REQUESTS = (
    "can you {}?", "could you {}?", "would you {}?", "can you please {}?", "could you just {}?",
    "I need you to {}.", "please {}.", "just {}.", "{} for me.",
)  # fmt: skip
REQUESTABLE = frozenset(
    ("stop", "stop talking", "stop that", "stop it", "wait", "wait a second", "wait a minute",
     "hold on", "hold on a second", "be quiet", "pause", "hang on", "hang on a sec", "shush",
     "give me a second", "give me a minute", "stop for a moment", "be quiet for a second",
     "let me think", "let me speak")
)  # fmt: skip

# Other wordings for choosing the stop threshold (validation), never trained on.
VALIDATION_STOP = (
    "Stop now.", "Please wait.", "Wait a bit.", "Hold on there.", "Shush, please.", "Quiet!",
    "Okay, hold on.", "Give me one second.", "Hang on a moment.", "Let me think a second.",
    "Never mind, stop.", "That's enough, stop.", "Can you wait?", "Could you be quiet?",
    "Stop, I need a second.", "Oh wait.", "Uh, hang on.", "One minute.", "Just a minute.",
    "Stop, okay?", "Pause for a second.", "Hold on, let me think.", "Be quiet, please.",
    "Hey, hold on.", "Stop it now.", "Shhh, quiet.", "Okay, never mind.", "Right, stop.",
    "Wait a little.", "No, wait.",
)  # fmt: skip

# Held out: other wordings again, evaluation only.
HELDOUT_STOP = (
    "Hold it.", "Halt.", "Zip it.", "Pause, please.", "Just a sec.", "Gimme a sec.",
    "Give me a moment.", "Hang on a minute.", "Let me think for a second.", "One moment, please.",
    "Stop right there.", "Wait up.", "Quiet down.", "Can you be quiet?", "Stop speaking.",
    "Please stop speaking.", "Shut it.", "Never mind that.", "Wait just a moment.",
    "Hold your horses.", "Be silent.", "Let me think it over.", "Stop for a second.",
    "No, no, stop.", "Hey, stop.", "Hold that thought.", "Okay, okay, stop.", "Wait, wait, wait.",
    "Shhhh.", "Sh.", "Hush, please.", "Give me a sec.", "Hang on, hang on.",
    "Hold on, hold on a moment.", "Um, wait.", "Stop, stop, stop.", "Okay, enough.",
    "That's enough now.", "Enough, thanks.", "Please, be quiet.", "Can you stop for a moment?",
    "Could you please stop?", "Wait, let me think.", "Hmm, let me think.",
    "Never mind, forget it.", "Forget about it.", "Quiet, please.", "Silence, please.",
    "Stop the talking.", "Let me finish.", "Shut up, please.", "Sorry, hold on.",
    "Hang on one second.", "Wait one sec.", "Just hold on.", "Hold on one moment.",
    "Okay, pause.", "Stop, please, stop.", "Just wait.", "Be quiet a moment.",
)  # fmt: skip

# Ordinary turns that use the same words: "end" (and their cuts "continue"), never "stop".
NOT_STOP = (
    "I can't wait.", "I can't wait to see it!", "Wait, what do you mean?", "Wait, really?",
    "Don't stop believing is a great song.", "Please don't stop.", "Hold on to your dreams.",
    "I just want the rain to stop.", "Never mind the weather, how are you?",
    "I can't stop laughing.", "Wait until you hear this one.", "It was hard to stop watching.",
    "Let me think about what I want for dinner tonight.", "That's enough money for a car.",
    "The bus didn't stop at my station.", "Hang on to the receipt.",
    "Give me a second chance and I'll prove it.", "One second was all it took.",
    "Be quiet in the library.", "I hate to wait in line.",
)  # fmt: skip


def phrase_key(text: str) -> str:
    """Wording only: the held-out test and the training phrases never share one."""
    return strip_all_punctuation(text.lower())


def stop_phrases(rng: random.Random, variants: int) -> Iterator[str]:
    """Every core with random filler / tail / repeat / request variants, minus the untrained
    wordings."""
    untrained = {phrase_key(p) for p in (*VALIDATION_STOP, *HELDOUT_STOP)}
    for core in STOP_CORES:
        for _ in range(variants):
            prefix = rng.choice(STOP_PREFIXES)
            sep = rng.choice([", ", " ", ", "])
            if core in REQUESTABLE and rng.random() < 0.3:
                phrase = sep.join(p for p in (prefix, rng.choice(STOP_REQUESTS).format(core)) if p)
            else:
                words = [prefix, core, rng.choice(STOP_SUFFIXES)]
                if rng.random() < 0.1:
                    words.insert(1, core)  # "wait, wait"
                phrase = sep.join(w for w in words if w) + rng.choice([".", "!", "", "."])
            phrase = phrase[0].upper() + phrase[1:]
            if phrase_key(phrase) not in untrained:
                yield phrase


def stop_examples(
    seed: int, interrupted: list[list[str]], lasts: list[str], variants: int = 40
) -> list[Example]:
    """Stop phrases (styled), some after a cut-off sentence ("I think the, wait, hold on")."""
    rng = random.Random(f"{seed}:stop")
    out: list[Example] = []
    for phrase in stop_phrases(rng, variants):
        text = phrase
        if interrupted and rng.random() < 0.2:
            words = rng.choice(interrupted)
            points = cut_points(words)
            if points:
                text = f"{' '.join(words[: rng.choice(points)])}, {phrase[0].lower()}{phrase[1:]}"
        last = rng.choice(lasts) if lasts and rng.random() < 0.7 else None
        out.append(Example(asr_style(text, rng), STOP, last, "stop"))
    return out


def not_stop_examples(seed: int) -> list[Example]:
    rng = random.Random(f"{seed}:not-stop")
    out: list[Example] = []
    for sentence in NOT_STOP:
        out += turn_examples(sentence.split(), rng, "not-stop", None, cuts=2, copies=3)
    return out


def listed_stop_examples(phrases: tuple[str, ...], seed: int) -> list[Example]:
    """Each listed phrase as written and once more in the ASR-style mix."""
    rng = random.Random(f"{seed}:listed-stop")
    out: list[Example] = []
    for phrase in phrases:
        out.append(Example(phrase, STOP, None, "stop"))
        out.append(Example(asr_style(phrase, rng), STOP, None, "stop"))
    return out


def heldout_stop_examples(seed: int = SEED) -> list[Example]:
    return listed_stop_examples(HELDOUT_STOP, seed)


def heldout_turn_examples(
    seed: int = SEED, limit: int | None = None, folder: Path = TOPICAL_DIR
) -> list[Example]:
    """The test recipe on test_freq: each turn whole plus one cut (first ``limit`` convs)."""
    conversations = load_topical("test_freq", folder)
    if limit is not None:
        conversations = dict(list(conversations.items())[:limit])
    return topical_examples(conversations, seed, cuts=1)


def split_groups(groups: list[str], val_fraction: float, seed: int) -> set[str]:
    """The validation share of ``groups``, chosen by a seeded shuffle."""
    ordered = sorted(set(groups))
    random.Random(f"{seed}:split").shuffle(ordered)
    return set(ordered[: round(len(ordered) * val_fraction)])


@dataclass(frozen=True)
class TrainingData:
    train: list[Example]
    val_turns: list[Example]  # topical valid_freq, held-back conversations
    val_stop: list[Example]  # VALIDATION_STOP
    val_chitchat: list[Example]


def training_data(
    seed: int = SEED,
    val_fraction: float = 0.15,
    cuts: int = 3,
    copies: int = 2,
    val_draws: int = 3,
    chitchat: bool = True,
    cache_dir: Path | None = None,
) -> TrainingData:
    topical = load_topical("valid_freq")
    val_ids = split_groups(list(topical), val_fraction, seed)
    train_conv = {c: m for c, m in topical.items() if c not in val_ids}
    val_conv = {c: m for c, m in topical.items() if c in val_ids}
    train = topical_examples(train_conv, seed, cuts, copies)
    # The test recipe (one cut per turn) drawn several times: a steadier tail estimate.
    val_turns = [e for r in range(val_draws) for e in topical_examples(val_conv, seed + r, 1)]

    lasts = [m for messages in train_conv.values() for m in messages]
    train += stop_examples(seed, [m.split() for m in lasts], lasts)
    train += not_stop_examples(seed)
    val_stop = listed_stop_examples(VALIDATION_STOP, seed)

    val_chitchat: list[Example] = []
    if chitchat:
        chats = load_chitchat(chitchat_file(cache_dir))
        val_chats = split_groups(list(chats), val_fraction, seed)
        train += chitchat_examples({c: t for c, t in chats.items() if c not in val_chats}, seed, 1)
        val_chitchat = chitchat_examples(
            {c: t for c, t in chats.items() if c in val_chats}, seed, 1
        )
    return TrainingData(train, val_turns, val_stop, val_chitchat)
