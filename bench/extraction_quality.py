"""Extraction quality and throughput on the annotated sample chats.

    python -m bench.extraction_quality [--configs default,sentence-free,message,session-free]

For each extraction configuration, on `examples/chats` scored against
`examples/expected_facts.json` (matching rule in memory/extraction_eval.py):
recall and precision of the raw model output (every parsed line) and after the
filters (grounding, polarity, tautology, length), the hallucination rate (raw facts
with a content word the user never wrote), and throughput in sessions/min.
`session-free` is the original design's approach (whole session, free generation)
and is the baseline measured in the same run; `model` is ``--extraction_method model``
(per sentence, constrained) and `rewrite` the default (memory.rewrite, no generation).
"""
import argparse
import json
import logging
import time
from pathlib import Path

from memory.chat_store import ChatStore
from memory.extraction import ExtractionConfig, extract_memory_entries
from memory.extraction_eval import load_expected, score_extraction
from memory.grounding import grounding_report
from recall.model_loading import load_model_and_tokenizer

CONFIGS = {
    "session-free": ExtractionConfig(unit="session", constrained=False, max_new_tokens=160, batch_size=4),
    "sentence-free": ExtractionConfig(unit="sentence", constrained=False),
    "message": ExtractionConfig(unit="message", constrained=True, max_new_tokens=80),
    "model": ExtractionConfig(),  # per sentence, constrained: --extraction_method model
    "rewrite": ExtractionConfig(method="rewrite"),  # the default: --extraction_method rewrite
}


def hallucination_rate(result, sessions) -> float:
    user_text = {s.session_id: "\n".join(m.content for m in s.messages if m.role == "user") for s in sessions}
    raw = result.raw_facts
    bad = sum(bool(grounding_report(f.text, user_text[f.session_id])) for f in raw)
    return bad / len(raw) if raw else 0.0


def run(name, cfg, lm, sessions, expected):
    start = time.perf_counter()
    result = extract_memory_entries(lm.model, lm.tokenizer, sessions, cfg, lm.runtime.autocast_dtype)
    seconds = time.perf_counter() - start
    raw, kept = score_extraction(result.raw_facts, expected), score_extraction(result.candidates, expected)
    return {"config": name, "raw_recall": raw["recall"], "raw_precision": raw["precision"],
            "recall": kept["recall"], "precision": kept["precision"], "n_raw": raw["n_facts"],
            "n_kept": kept["n_facts"], "hallucination_rate": hallucination_rate(result, sessions),
            "seconds": seconds, "sessions_per_min": 60 * len(sessions) / seconds}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--chats", default="examples/chats")
    ap.add_argument("--expected", default="examples/expected_facts.json")
    ap.add_argument("--json", default="bench/results/extraction_quality.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    lm = load_model_and_tokenizer()
    sessions = ChatStore(args.chats).load_sessions(strict=True).sessions
    expected = load_expected(args.expected)
    rows = [run(name, CONFIGS[name], lm, sessions, expected) for name in args.configs.split(",")]
    print(f"\n{len(sessions)} sessions, {len(expected)} expected facts\n")
    print("| config | raw recall | raw precision | hallucinated (raw) | recall | precision | facts kept | sessions/min |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['raw_recall']:.2f} | {r['raw_precision']:.2f} | {r['hallucination_rate']:.2f} "
              f"| {r['recall']:.2f} | {r['precision']:.2f} | {r['n_kept']} | {r['sessions_per_min']:.1f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "sessions": len(sessions)}, indent=2))


if __name__ == "__main__":
    main()
