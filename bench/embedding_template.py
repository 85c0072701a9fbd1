"""Which template should the (untrained) chat model use for memory keys and queries?

Memory bank: the *current* facts of each user in ``examples/expected_facts.json``: every
restatement is dropped (the first wording stays) and so is every fact that a later item
supersedes. Every question of ``examples/questions.json`` is
embedded as a query and ranked, by cosine, against its own user's facts only. A question
is answered at rank r when the r-th fact is the first one containing ``expected``
(case-insensitive substring). Reported: recall@1, recall@5, MRR, and encoding time per
100 texts (median of ``--repeats`` passes over all queries + keys, after a warm-up).

Rows, all in the same run:

* ``smollm2-last-token-raw``: SmolLM2 last-token state, ``{text}`` for queries and keys;
* ``smollm2-last-token-prompteol``: the same with the PromptEOL template for both;
* ``minilm-mean`` (baseline): all-MiniLM-L6-v2 mean pooling, the usual RAG encoder;
* ``chance``: the expected scores of a uniformly random ranking (no time).

Time ratios are against ``minilm-mean``. The SmolLM2 rows run as the product runs them
(``load_model_and_tokenizer`` runtime, including CPU bf16 autocast where it measured faster;
``--precision fp32`` turns that off).

    python3 -m bench.embedding_template --json bench/results/embedding_template.json
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from memory.vectors import SentenceEncoderVectorizer
from recall.get_text_embedding import TEMPLATES, extract_last_token_embedding
from recall.model_loading import load_model_and_tokenizer

logger = logging.getLogger("bench.embedding_template")
Encoder = Callable[[Sequence[str]], np.ndarray]
BASELINE = "minilm-mean"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--facts", default="examples/expected_facts.json")
    p.add_argument("--questions", default="examples/questions.json")
    p.add_argument("--model_name_or_path", default=None, help="chat model (default: embedded SmolLM2)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--repeats", type=int, default=3, help="timed passes per encoder (median)")
    p.add_argument("--json", default="bench/results/embedding_template.json", help="output JSON path")
    return p.parse_args()


def _read_list(path: str, fields: Sequence[str]) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list")
    for i, item in enumerate(items):
        missing = [k for k in fields if k not in item]
        if missing:
            raise ValueError(f"{path}: item {i} lacks field(s) {missing}")
    return items


def current_facts(items: list[dict]) -> dict[str, list[str]]:
    """user -> current fact texts. ``restates``/``supersedes`` name the first item that
    stated a value, so a restatement is dropped and so is every item whose first wording
    was superseded."""
    superseded = {it["supersedes"] for it in items if it.get("supersedes")}
    bank: dict[str, list[str]] = {}
    for it in items:
        if it.get("restates") or it["id"] in superseded:
            continue
        bank.setdefault(it["user_id"], []).append(it["fact"])
    return bank


def first_hit_rank(scores: np.ndarray, facts: list[str], expected: str) -> int:
    """1-based rank of the first fact containing ``expected``; 0 when none does."""
    for rank, j in enumerate(np.argsort(-scores, kind="stable"), start=1):
        if expected.lower() in facts[j].lower():
            return rank
    return 0


def retrieval_metrics(ranks: list[int]) -> dict:
    n = len(ranks)
    return {"recall@1": sum(0 < r <= 1 for r in ranks) / n,
            "recall@5": sum(0 < r <= 5 for r in ranks) / n,
            "mrr": sum(1 / r for r in ranks if r) / n}


def chance_metrics(bank: dict[str, list[str]], questions: list[dict]) -> dict:
    """Expected recall@k / MRR of a uniformly random ranking (m relevant among n facts)."""
    r1 = r5 = mrr = 0.0
    for q in questions:
        facts = bank[q["user_id"]]
        n, m = len(facts), sum(q["expected"].lower() in f.lower() for f in facts)
        # P(first relevant at rank r) = C(n-r, m-1) / C(n, m)
        p = [_comb(n - r, m - 1) / _comb(n, m) if m else 0.0 for r in range(1, n + 1)]
        r1 += sum(p[:1])
        r5 += sum(p[:5])
        mrr += sum(pr / r for r, pr in enumerate(p, start=1))
    k = len(questions)
    return {"recall@1": r1 / k, "recall@5": r5 / k, "mrr": mrr / k}


def _comb(n: int, k: int) -> int:
    return math.comb(n, k) if 0 <= k <= n else 0


def evaluate(encode: Encoder, bank: dict[str, list[str]], questions: list[dict]) -> tuple[dict, list[int]]:
    keys = {user: encode(facts) for user, facts in bank.items()}
    queries = encode([q["question"] for q in questions])
    ranks = [first_hit_rank(keys[q["user_id"]] @ queries[i], bank[q["user_id"]], q["expected"])
             for i, q in enumerate(questions)]
    return retrieval_metrics(ranks), ranks


def seconds_per_100(encode: Encoder, texts: list[str], repeats: int) -> float:
    encode(texts[:8])  # warm-up: first-call allocations, autocast caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encode(texts)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / len(texts) * 100


def build_encoders(args) -> tuple[dict[str, Encoder], dict]:
    loaded = load_model_and_tokenizer(args.model_name_or_path, precision=args.precision)
    autocast = loaded.runtime.autocast_dtype

    def chat(template: str) -> Encoder:
        return lambda texts: extract_last_token_embedding(
            loaded.model, loaded.tokenizer, list(texts), template=TEMPLATES[template],
            autocast_dtype=autocast).numpy()

    minilm = SentenceEncoderVectorizer("minilm")
    encoders = {"smollm2-last-token-raw": chat("raw"),
                "smollm2-last-token-prompteol": chat("prompteol"),
                BASELINE: minilm.encode}
    setup = {"chat_model": loaded.source.identity, "device": str(loaded.runtime.device),
             "param_dtype": str(loaded.runtime.param_dtype), "autocast_dtype": str(autocast),
             "baseline_encoder": minilm.encoder_id}
    return encoders, setup


def markdown_table(rows: dict[str, dict]) -> str:
    base = rows[BASELINE]["sec_per_100_texts"]
    lines = ["| encoder | recall@1 | recall@5 | MRR | s / 100 texts | time vs MiniLM |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        t = r.get("sec_per_100_texts")
        timing = f"{t:.3f} | {t / base:.2f}x" if t is not None else "- | -"
        lines.append(f"| {name} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | {r['mrr']:.3f} | {timing} |")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".embedding_template.", dir=Path(path).parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args()
    bank = current_facts(_read_list(args.facts, ["id", "user_id", "fact"]))
    questions = _read_list(args.questions, ["question", "expected", "user_id"])
    unknown = sorted({q["user_id"] for q in questions} - bank.keys())
    if unknown:
        raise ValueError(f"{args.questions}: questions for users without facts: {unknown}")
    texts = [f for facts in bank.values() for f in facts] + [q["question"] for q in questions]
    encoders, setup = build_encoders(args)
    rows, ranks = {}, {}
    for name, encode in encoders.items():
        logger.info("evaluating %s", name)
        metrics, ranks[name] = evaluate(encode, bank, questions)
        rows[name] = {**metrics, "sec_per_100_texts": seconds_per_100(encode, texts, args.repeats)}
    rows["chance"] = chance_metrics(bank, questions)
    unanswerable = [q["question"] for q in questions
                    if not any(q["expected"].lower() in f.lower() for f in bank[q["user_id"]])]
    print(markdown_table(rows))
    if unanswerable:
        logger.warning("%d question(s) have no current fact containing `expected`: %s",
                       len(unanswerable), unanswerable)
    write_json(args.json, {
        "setup": {**setup, "facts": args.facts, "questions": args.questions,
                  "n_keys": {u: len(f) for u, f in bank.items()}, "n_questions": len(questions),
                  "n_texts_timed": len(texts), "repeats": args.repeats},
        "results": rows, "unanswerable": unanswerable,
        "per_question_rank": {name: [{"question": q["question"], "rank": r}
                                     for q, r in zip(questions, rs)] for name, rs in ranks.items()}})
    logger.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
