"""Extraction quality: facts found, precision, junk and the update rule, per data set and method.

    python -m bench.extraction_quality                                  # the development sets
    python -m bench.extraction_quality --sets test --json bench/results/extraction_quality_test.json

Data sets (each a folder with ``chats/``, ``expected_facts.json`` and optionally ``noise.json``):
``dev`` = ``examples/``, ``dev2`` = ``examples/dev/``, ``dev3`` = ``examples/dev3/`` (all used to
choose; dev3 was written without reading the rules, and its first figures, measured before any
rule was changed for it, are in ``docs/memory.md``), ``test`` =
``examples/test/`` (never used to choose: run it once per finished change). For each set and
method (``rewrite``, the default; ``model``, the chat model restating each sentence), in one run:

- facts found (recall) and precision by the matching rule (``memory.extraction_eval``), and recall
  per annotated kind (short answers, facts not in the first person, references, negations...);
- junk: stored memories that are not self-contained facts (filler, an unresolved reference, or
  taken from a message annotated as noise);
- the update rule: the candidates go through ``memory.ingest`` into a fresh DB (memory vectors of
  the default model), and its supersessions are scored against the annotated ``supersedes``;
- the update rule alone: the annotated facts themselves stored in the order they were said, scored
  the same way (the same for every method: extraction misses cannot lower it);
- extraction seconds per session (without the model's load);
- LoCoMo (``--locomo``, default conversations 0-4, the development ones; 5-9 are test): coverage
  of the gold ``observation`` facts. A gold fact is covered when an extracted fact of the same
  speaker and session has all-MiniLM-L6-v2 cosine >= 0.7 with it *and* shares two content words
  other than the speaker's name (stricter than ``bench.locomo``'s 0.6 and one word); the
  matches closest to the threshold are printed so the matcher can be judged. Also the share of
  extracted facts whose best cosine to any gold fact of their speaker is < 0.4 ("unsupported").

Methods: ``rewrite`` (the default: rules, no generation), ``model`` (the chat model restates
each sentence, constrained to the sentence's words) and ``combined`` (the rewrite's facts, plus
the model's for messages where the rules found none), side by side in one run.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETS = {"dev": ROOT / "examples", "dev2": ROOT / "examples" / "dev", "dev3": ROOT / "examples" / "dev3",
        "test": ROOT / "examples" / "test"}
METHODS = ("rewrite", "model", "combined")
STRICT_COSINE, STRICT_SHARED = 0.7, 2


def run(name: str, folder: Path, method: str, lm, vectorizer) -> dict:
    from memory.chat_store import ChatStore
    from memory.extraction import ExtractionConfig, extract_memory_entries
    from memory.extraction_eval import (annotated_candidates, junk, load_expected, load_noise, recall_by_kind,
                                        score_extraction, score_updates)
    from memory.ingest import ingest_candidates
    from memory.vector_db import MemoryVectorDB

    sessions = ChatStore(folder / "chats").load_sessions(strict=True).sessions
    expected = load_expected(folder / "expected_facts.json")
    noise = load_noise(folder / "noise.json")
    start = time.perf_counter()
    result = extract_memory_entries(lm.model, lm.tokenizer, sessions, ExtractionConfig(method=method),
                                    lm.runtime.autocast_dtype)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp, MemoryVectorDB(Path(tmp) / "db") as db:
        ingest_candidates(db, result.candidates, vectorizer)
        records = db.records()
        updates = score_updates(records, expected)
    with tempfile.TemporaryDirectory() as tmp, MemoryVectorDB(Path(tmp) / "db") as db:  # the rule alone
        ingest_candidates(db, annotated_candidates(expected, sessions), vectorizer)
        rule = score_updates(db.records(), expected)
    kept = score_extraction(result.candidates, expected)
    junk_rows = junk(result.candidates, expected, noise)
    return {"set": name, "method": method, "sessions": len(sessions), "expected": len(expected),
            "facts_found": kept["recall"], "precision": kept["precision"], "extracted": kept["n_facts"],
            "stored": len(records), "junk": len(junk_rows), "junk_examples": junk_rows[:15],
            "update_precision": updates["precision"], "update_recall": updates["recall"],
            "updates": {k: updates[k] for k in ("events", "correct", "expected", "wrong")},
            "rule_alone_precision": rule["precision"], "rule_alone_recall": rule["recall"],
            "rule_alone": {k: rule[k] for k in ("events", "correct", "expected", "wrong")},
            "by_kind": recall_by_kind(result.candidates, expected),
            "seconds_per_session": seconds / max(len(sessions), 1),
            "missed": [e["fact"] for e in expected if not any(
                c.session_id == e["session_id"] and all(k.lower() in c.text.lower() for k in e["keywords"])
                for c in result.candidates)][:40]}


def run_locomo(conversations, method: str, lm, minilm) -> dict:
    """Gold-observation coverage of one method on LoCoMo conversations (see the module docstring)."""
    import numpy as np

    from memory.extraction import ExtractionConfig, extract_memory_entries
    from memory.grounding import content_words
    from memory.locomo import chat_sessions, user_id

    covered, loose, unsupported, near, sessions_n, seconds = [], [], [], [], 0, 0.0
    for conv in conversations:
        sessions = chat_sessions(conv)
        sessions_n += len(sessions)
        start = time.perf_counter()
        result = extract_memory_entries(lm.model, lm.tokenizer, sessions, ExtractionConfig(method=method),
                                        lm.runtime.autocast_dtype)
        seconds += time.perf_counter() - start
        speaker_of = {user_id(conv, name): name for name in conv.speakers}
        number = {s.session_id: int(s.session_id.rsplit("-s", 1)[1].split("-")[0]) for s in sessions}
        got = [(speaker_of[c.user_id], number.get(c.session_id), re.sub(r"\b[Tt]he user\b", speaker_of[c.user_id], c.text))
               for c in result.candidates]
        gold = [(f.speaker, f.session, f.text) for f in conv.facts]
        if not got or not gold:
            covered += [False] * len(gold)
            loose += [False] * len(gold)
            continue
        sims = minilm.encode([g[2] for g in gold]) @ minilm.encode([e[2] for e in got]).T
        for i, (speaker, session, text) in enumerate(gold):
            name = {w.lower() for w in speaker.split()}
            best_strict, best_loose = None, False
            for j, (e_speaker, e_session, e_text) in enumerate(got):
                if (e_speaker, e_session) != (speaker, session):
                    continue
                shared = (content_words(text) & content_words(e_text)) - name
                if sims[i, j] >= 0.6 and shared:
                    best_loose = True
                if sims[i, j] >= STRICT_COSINE and len(shared) >= STRICT_SHARED:
                    if best_strict is None or sims[i, j] > best_strict[0]:
                        best_strict = (float(sims[i, j]), text, e_text)
            covered.append(best_strict is not None)
            loose.append(best_loose)
            if best_strict:
                near.append(best_strict)
        for j, (e_speaker, _, _) in enumerate(got):
            same = [i for i, g in enumerate(gold) if g[0] == e_speaker]
            unsupported.append(max((sims[i, j] for i in same), default=0.0) < 0.4)
    near.sort()
    return {"set": "locomo", "method": method, "conversations": [c.sample_id for c in conversations],
            "gold_facts": len(covered), "coverage": float(np.mean(covered)) if covered else 0.0,
            "coverage_loose": float(np.mean(loose)) if loose else 0.0,
            "unsupported_rate": float(np.mean(unsupported)) if unsupported else 0.0,
            "extracted": len(unsupported), "seconds_per_session": seconds / max(sessions_n, 1),
            "matches_at_threshold": [{"cosine": round(c, 3), "gold": g, "extracted": e} for c, g, e in near[:8]]}


def locomo_table(rows) -> str:
    lines = [f"| LoCoMo conversations | method | gold facts | coverage (cosine >= {STRICT_COSINE} and {STRICT_SHARED} "
             "shared words) | coverage (cosine >= 0.6 and 1 word) | extracted | unsupported | s/session |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {', '.join(r['conversations'])} | {r['method']} | {r['gold_facts']} | {r['coverage']:.3f} | "
                     f"{r['coverage_loose']:.3f} | {r['extracted']} | {r['unsupported_rate']:.3f} | "
                     f"{r['seconds_per_session']:.2f} |")
    for r in rows[:1]:
        lines += ["", f"Strict matches closest to the threshold ({r['method']}):", ""]
        lines += [f"- {m['cosine']:.3f}: gold \"{m['gold']}\" / extracted \"{m['extracted']}\"" for m in r["matches_at_threshold"][:5]]
    return "\n".join(lines)


def table(rows) -> str:
    lines = ["| set | method | facts found | precision | junk | update precision | update recall | "
             "rule alone: precision | rule alone: recall | s/session |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['set']} | {r['method']} | {r['facts_found']:.2f} | {r['precision']:.2f} | {r['junk']} | "
                     f"{fmt(r['update_precision'])} | {fmt(r['update_recall'])} | {fmt(r.get('rule_alone_precision'))} | "
                     f"{fmt(r.get('rule_alone_recall'))} | {r['seconds_per_session']:.2f} |")
    kinds = sorted({k for r in rows for k in r["by_kind"]})
    lines += ["", "| set | method | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for r in rows:
        cells = [f"{r['by_kind'][k]['recall']:.2f} ({r['by_kind'][k]['n']})" if k in r["by_kind"] else "–" for k in kinds]
        lines.append(f"| {r['set']} | {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench.speed import cpu_description
    from memory.vectors import build_vectorizer
    from recall.model_loading import load_model_and_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="dev,dev2,dev3", help=f"comma-separated of {', '.join(SETS)}")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--locomo", default="0,1,2,3,4",
                    help="LoCoMo conversations (0-4 development, 5-9 test); '' for none")
    ap.add_argument("--locomo_methods", default="rewrite", help="methods run on LoCoMo (the model takes minutes per conversation)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "extraction_quality.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    lm = load_model_and_tokenizer()
    vectorizer = build_vectorizer("chat", lm)
    rows = [run(s, SETS[s], m, lm, vectorizer) for s in args.sets.split(",") if s for m in args.methods.split(",")]
    print(table(rows))
    locomo_rows = []
    if args.locomo:
        from memory.locomo import load_locomo
        from memory.vectors import SentenceEncoderVectorizer

        convs = load_locomo()
        picked = [convs[int(i)] for i in args.locomo.split(",")]
        minilm = SentenceEncoderVectorizer("minilm")
        locomo_rows = [run_locomo(picked, m, lm, minilm) for m in args.locomo_methods.split(",") if m]
        print()
        print(locomo_table(locomo_rows))
    out = {"date": time.strftime("%Y-%m-%d"), "machine": cpu_description(), "rows": rows, "locomo": locomo_rows,
           "command": " ".join(["python -m bench.extraction_quality", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
