"""`python -m llm.train_verifier`: label drafts with the slow model as judge, train the verifier.

Data: Topical-Chat ``valid_freq`` only, split by conversation (80 % train, 20 % validation);
``test_freq`` is never read here. For one turn of each conversation (seeded):

1. the drafter writes a prefix for that turn, exactly as at run time;
2. the slow model continues the reply from it (assistant pre-fill), as the relay would;
3. the slow model, shown the last ~200 words, rates the prefix as the start of a reply from 1
   to 5 (greedy; the RelayS2S recipe with our own prompt, ``judge_prefix.txt``); 4 or 5 is
   good. (Asked Yes/No it said Yes to every one of 20 drafts, "the should." included.) But
   a prefix from which the slow model's continuation refuses or knows nothing ("I'm sorry,"
   -> "but I can't assist with that.") is bad whatever the rating: the judge rated 33 of 37
   such prefixes good, yet the reply they commit to does not answer;
4. a deliberately bad prefix: another conversation's draft, scored teacher-forced by the
   drafter in this context (label 0 without asking the judge).

Labels are cached as JSON lines (re-running labels only drafts that changed, then trains);
greedy decoding makes them deterministic. The threshold is the lowest that keeps precision
>= ``--precision`` on the validation drafts: the share of spoken prefixes that are good.
(The bad prefixes of step 4 teach the model but are never spoken; counting them would set
the bar by a mix the relay never sees.) Validation metrics are written beside the weights
(``verifier.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from llm.backend import LlamaBackend, Message, Token
from llm.drafter import LlamaDrafter
from llm.relay import Draft
from llm.verifier import WEIGHTS_FILE, Verifier, VerifierModel
from voice.corpora import topical_chat
from voice.embedding import TextEmbedder
from voice.models import resolve
from voice.settings import Settings

JUDGE_PROMPT = Path(__file__).with_name("judge_prefix.txt")
SEED = 11
GOOD_RATING = 4  # the judge is lenient: 3 ("generic or a little off") is not good enough
REFUSAL = re.compile(
    r"\b(can't|cannot|can not|unable to) (assist|help|provide)"
    r"|\b(don't|do not) (know|have (any )?(information|details|data))",
    re.IGNORECASE,
)
CONTEXT_WORDS = 200


def is_validation(conversation_id: str) -> bool:
    return zlib.crc32(conversation_id.encode()) % 5 == 0


def contexts(limit: int) -> list[dict[str, object]]:
    """One (history, user message) per conversation: the reply is to turn ``i - 1``."""
    data = topical_chat("valid_freq")
    rng = np.random.default_rng(SEED)
    out = []
    for conversation_id in sorted(data)[:limit]:
        turns = [t["message"].strip() for t in data[conversation_id]]
        i = int(rng.integers(1, len(turns)))
        user_turns = {(i - 1 - k) for k in range(0, i, 2)}
        history = [
            {"role": "user" if j in user_turns else "assistant", "content": turns[j]}
            for j in range(max(0, i - 4), i - 1)
        ]
        out.append(
            {
                "id": conversation_id,
                "history": history,
                "user": turns[i - 1],
                "validation": is_validation(conversation_id),
            }
        )
    return out


def recent_words(history: Sequence[Message], user: str) -> str:
    lines = [f"{m.role.title()}: {m.content}" for m in history if m.role != "system"]
    lines.append(f"User: {user}")
    words = "\n".join(lines).split(" ")
    return " ".join(words[-CONTEXT_WORDS:])


async def judge(slow: LlamaBackend, context: str, prefix: str) -> int:
    """The slow model's 1-5 rating of how the reply begins (0 if it gave no number)."""
    prompt = JUDGE_PROMPT.read_text().format(context=context, prefix=prefix)
    answer = ""
    async for token in slow.stream([Message(role="user", content=prompt)], max_tokens=3):
        answer += token.text
    digits = [c for c in answer if c in "12345"]
    return int(digits[0]) if digits else 0


def draft_label(rating: int, prefix: str, rest: str) -> int:
    """1 when the judge rated the prefix good and the reply it leads to does not refuse."""
    return int(rating >= GOOD_RATING and not REFUSAL.search(f"{prefix}{rest}"))


def token_rows(tokens: Sequence[Token]) -> list[list[float]]:
    return [[t.logprob, t.entropy, t.margin] for t in tokens]


async def label(settings: Settings, limit: int, labels_file: Path) -> None:
    done = {  # key -> the prefix it labels; a draft the drafter now writes differently is redone
        (r := json.loads(line))["key"]: r["prefix"]
        for line in (labels_file.read_text().splitlines() if labels_file.exists() else [])
    }
    draft_backend = LlamaBackend("draft", resolve(settings.llm.draft_model, settings).path, 1, 2048)
    slow = LlamaBackend("slow", resolve(settings.llm.slow_model, settings).path, 2, 2048)
    drafter = LlamaDrafter(draft_backend, settings.llm)
    system = Message(role="system", content=settings.llm.system_prompt)
    items = contexts(limit)
    drafts: dict[str, Draft] = {}
    started = time.perf_counter()
    with labels_file.open("a") as out:
        for n, item in enumerate(items):
            history = [system, *(Message(**m) for m in item["history"])]  # type: ignore[arg-type]
            user = str(item["user"])
            draft = await drafter.draft(history, user)
            drafts[str(item["id"])] = draft
            key = f"{item['id']}/draft"
            if done.get(key) != draft.text and draft.text:
                messages = [*history, Message(role="user", content=user)]
                rest = "".join([t.text async for t in slow.stream(messages, draft.text, 24)])
                rating = await judge(slow, recent_words(history, user), draft.text)
                record = {
                    "key": key,
                    "label": draft_label(rating, draft.text, rest),
                    "rating": rating,
                    "prefix": draft.text,
                    "reply_rest": rest,
                }
                out.write(json.dumps(record | _common(item, draft.tokens)) + "\n")
            other = drafts.get(str(items[n - 1]["id"])) if n else None
            key = f"{item['id']}/mismatch"
            if other is not None and other.text and done.get(key) != other.text:
                forced = await draft_backend.score(drafter.messages(history, user), other.text)
                record = {"key": key, "label": 0, "prefix": other.text}
                out.write(json.dumps(record | _common(item, tuple(forced))) + "\n")
            out.flush()
            print(
                f"\r{n + 1}/{len(items)} {time.perf_counter() - started:.0f} s", end="", flush=True
            )
    print()
    draft_backend.close()
    slow.close()


def _common(item: dict[str, object], tokens: Sequence[Token]) -> dict[str, object]:
    return {
        "id": item["id"],
        "validation": item["validation"],
        "history": item["history"],
        "user": item["user"],
        "tokens": token_rows(tokens),
    }


def features(embedder: TextEmbedder, records: list[dict]) -> np.ndarray:
    verifier = Verifier(VerifierModel(np.zeros(1), 0.0, np.zeros(1), np.ones(1), 0.5), embedder)
    rows = []
    for r in records:
        tokens = tuple(Token(text="", logprob=a, entropy=b, margin=c) for a, b, c in r["tokens"])
        draft = Draft(transcript=r["user"], text=r["prefix"], tokens=tokens)
        rows.append(verifier.features([], draft))
    return np.stack(rows)


def train(settings: Settings, labels_file: Path, out: Path, precision: float) -> dict[str, float]:
    # A key labelled again (its draft changed) counts with its latest record only.
    latest = {(r := json.loads(line))["key"]: r for line in labels_file.read_text().splitlines()}
    records = list(latest.values())
    embedder = TextEmbedder(resolve("embedding", settings).path, settings.embedding.threads)
    x = features(embedder, records)
    y = np.array(  # drafts relabelled: the cache keeps the judge's rating and the continuation
        [
            draft_label(r["rating"], r["prefix"], r["reply_rest"]) if "rating" in r else r["label"]
            for r in records
        ]
    )
    val = np.array([r["validation"] for r in records])
    mean, scale = x[~val].mean(axis=0), x[~val].std(axis=0) + 1e-6
    best: tuple[float, float, LogisticRegression] | None = None
    for c in (0.01, 0.03, 0.1, 0.3, 1.0):  # regularisation chosen on validation AUROC
        model = LogisticRegression(C=c, max_iter=2000).fit((x[~val] - mean) / scale, y[~val])
        auc = roc_auc_score(y[val], model.predict_proba((x[val] - mean) / scale)[:, 1])
        if best is None or auc > best[0]:
            best = (auc, c, model)
    assert best is not None
    auc, c, model = best
    verifier = VerifierModel(model.coef_[0], float(model.intercept_[0]), mean, scale, 0.5)
    drafts_val = np.array([r["key"].endswith("/draft") for r in records]) & val
    p_drafts = verifier.probability(x[drafts_val])
    threshold = 1.0
    for t in sorted(set(np.round(p_drafts, 4)), reverse=True):
        kept = p_drafts >= t
        if kept.any() and y[drafts_val][kept].mean() >= precision:
            threshold = float(t)
    verifier.threshold = threshold
    verifier.save(out)
    kept = p_drafts >= threshold
    metrics = {
        "verifier_auroc_validation": float(auc),
        # The judge's labels alone (no deliberately bad prefixes): the harder question.
        "verifier_auroc_validation_drafts_only": float(roc_auc_score(y[drafts_val], p_drafts))
        if len(set(y[drafts_val])) == 2
        else float("nan"),
        "c": c,
        "threshold": threshold,
        "n_train": int((~val).sum()),
        "n_validation": int(val.sum()),
        "good_rate_drafts": float(y[[r["key"].endswith("/draft") for r in records]].mean()),
        "validation_keep_rate_drafts": float(kept.mean()),
        "validation_precision_kept_drafts": float(y[drafts_val][kept].mean())
        if kept.any()
        else float("nan"),
    }
    out.with_suffix(".json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, default=300)
    parser.add_argument("--labels", type=Path, default=None, help="JSON lines cache of labels")
    parser.add_argument("--out", type=Path, default=WEIGHTS_FILE)
    parser.add_argument("--precision", type=float, default=0.95)
    parser.add_argument("--train-only", action="store_true")
    args = parser.parse_args()
    settings = Settings.load()
    labels = args.labels or settings.models.cache_dir / "verifier" / "labels.jsonl"
    labels.parent.mkdir(parents=True, exist_ok=True)
    if not args.train_only:
        asyncio.run(label(settings, args.contexts, labels))
    print(json.dumps(train(settings, labels, args.out, args.precision), indent=2))


if __name__ == "__main__":
    main()
