"""LoCoMo: retrieval with gold memories, extraction vs gold, and end-to-end answers.

    python -m bench.locomo --quick                      # conversation 0, first 5 sessions (minutes)
    python -m bench.locomo --conversations all          # all 10 (hours on a 2-core CPU; resumable)
    python -m bench.locomo --parts retrieval,extraction --conversations 0,1

LoCoMo is read in place (``--locomo``, default ``../shared/benchmarks/locomo/locomo10.json``).
Each (part, conversation) writes ``bench/results/locomo/<mode>/<part>-<sample_id>.json`` when it
finishes; a rerun skips what is written and resumes the rest (the work directories keep the
imported chats, the memory DB with its generated cues, and the pipeline's runs, which resume
from their newest complete checkpoint). ``--fresh`` starts over.

Parts, per conversation:
- **retrieval**: the ``observation`` facts are the memory bank (one bank per conversation,
  both speakers). The chats are imported (one session per speaker side) and marked as
  already extracted, then the real pipeline (``MemoryTrainingService.run_training``) trains
  step 1 on cues that never include LoCoMo's questions (the fact, its source turn, questions
  the base model writes) plus the conversation's turns as unlabelled texts for the teacher.
  Questions: categories 1-4 whose evidence turns an observation cites. A hit: a retrieved
  memory cites an evidence turn. Trained ``<recall>``, the untrained base model (PromptEOL
  last token), all-MiniLM-L6-v2 and BM25, on the same bank, in the same run.
- **extraction**: the base model extracts facts from the imported chats (the pipeline's
  extractor, all defaults). Gold coverage: a gold fact is matched when an extracted fact of
  the same speaker and session has MiniLM cosine >= 0.6 with it and shares a content word
  other than the speaker's name ("The user" is read as the speaker). Unsupported: an
  extracted fact whose best cosine to any gold fact of its speaker is < 0.4.
- **e2e**: step 2 and publishing continue the retrieval part's run; each question is answered
  by the recall loop with ``chat.py``'s defaults (recall auto) and with recall forced, by the RAG
  peer (MiniLM top 1 and top 3 pasted into the prompt of the same base model), and by the base
  model with no memory; every answer is cut the same way (``short_answer``: first line, at most
  30 words); LoCoMo's F1 per category, context tokens and seconds per answer.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import resource
import shutil
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from memory.locomo import (BM25, CATEGORIES, DEFAULT_PATH, Conversation, answer_f1, chat_sessions, gold_candidates,
                           load_locomo)

logger = logging.getLogger("bench.locomo")
RESULTS = Path("bench/results/locomo")
QUICK_SESSIONS = 5
INSTRUCTION = "Answer in a few words."


PIPELINE_FLAGS: List[str] = []  # --pipeline: extra run_training.py flags for every run


def _args(work: Path, epochs: float, stage: str):
    from memory.config import parse_args

    return parse_args(["--output_dir", str(work), "--chats_dir", str(work / "chats"), "--stage", stage,
                       "--k_folds", "0", "--num_train_epochs", str(epochs), *PIPELINE_FLAGS])


def prepare(conv: Conversation, work: Path, service) -> Dict[int, List[str]]:
    """Chats into the store (marked extracted: the bank is the gold facts), gold facts into
    the DB; returns memory id -> cited turns. Safe to rerun after a crash at any point: the
    facts are added only when the conversation's bank is empty, and the id -> turns map is
    rebuilt from the stored texts."""
    db = service.db
    for session in chat_sessions(conv):
        if db.session_state(session.session_id) != session.content_hash():
            path = service.save_chat_session(session)
            db.mark_session_processed(session.session_id, session.content_hash(), str(path), 0)
    pairs = gold_candidates(conv, bank_user=conv.sample_id)
    if not db.count(user_id=conv.sample_id):
        vectorizer = service.vectorizer()
        vectors = np.asarray(vectorizer.encode([c.text for c, _ in pairs]), dtype=np.float32)
        db.add([c for c, _ in pairs], vectors, vectorizer.encoder_id)
        db.flush()
    turns_of: Dict[str, set] = {}
    for cand, cited in pairs:
        turns_of.setdefault(cand.text, set()).update(cited)
    return {r.id: sorted(turns_of.get(r.text, ())) for r in db.records(user_id=conv.sample_id)}


def _questions(conv: Conversation) -> List[dict]:
    return [{"question": q.question, "expected": q.answer or "-", "user_id": conv.sample_id,
             "evidence": list(q.evidence), "category": q.category} for q in conv.questions()]


def _per_category(rows: List[dict], questions: List[dict], key: str) -> Dict[str, dict]:
    out: Dict[str, dict] = {}
    for cat in sorted({q["category"] for q in questions}):
        vals = [r[key] for r, q in zip(rows, questions) if q["category"] == cat]
        out[CATEGORIES[cat]] = {"n": len(vals), "mean": float(np.mean(vals)) if vals else None}
    return out


def run_retrieval(conv: Conversation, work: Path, epochs: float, stage: str) -> dict:
    from memory.evaluation import _compare_retrievers, step1_scorers
    from memory.training_service import MemoryTrainingService
    from memory.vector_db import MemoryVectorDB

    started = time.perf_counter()
    service = MemoryTrainingService(*_args(work, epochs, stage))
    try:
        cited = prepare(conv, work, service)
        recall_dirs = sorted(work.glob("runs/*/recall/metrics.json"))
        summary = None
        if not recall_dirs or stage == "all":
            summary = service.run_training(stage)
            recall_dirs = sorted(work.glob("runs/*/recall/metrics.json"))
    finally:
        service.close()
    train_seconds = time.perf_counter() - started
    run_recall = recall_dirs[-1].parent
    questions = _questions(conv)

    def is_hit(q, record):
        return bool(set(q["evidence"]) & set(cited.get(record.id, ())))

    def bm25(texts, records):
        index = BM25([r.text for r in records])
        return np.array([index.scores(t) for t in texts])

    db = MemoryVectorDB(work / "memory_db")
    try:
        started_eval = time.perf_counter()
        trained, base_embed = step1_scorers(run_recall, db, precision="fp32")
        report = {"sample_id": conv.sample_id, "memories": len(cited), "questions": len(questions),
                  "model_dir": str(run_recall), "pipeline_flags": PIPELINE_FLAGS}
        _compare_retrievers(report, questions, db, trained, base_embed, is_hit=is_hit, extra=[("bm25", bm25)])
    finally:
        db.close()
    for name in ("trained_recall", "untrained_last_token", "minilm_rag", "bm25"):
        rows = report[name]["per_question"]
        for r in rows:
            r["hit_at_5"] = 1.0 if 0 < r["rank"] <= 5 else 0.0
        report[name]["by_category_recall_at_5"] = _per_category(rows, questions, "hit_at_5")
    report["step1"] = json.loads((run_recall / "metrics.json").read_text())
    report["seconds"] = {"train": train_seconds, "evaluate": time.perf_counter() - started_eval}
    if summary is not None:
        report["stage_seconds"] = summary.stage_seconds
    return report


def run_extraction(conv: Conversation, work: Path) -> dict:
    from memory.grounding import content_words
    from memory.training_service import MemoryTrainingService
    from memory.vectors import SentenceEncoderVectorizer

    started = time.perf_counter()
    sessions = chat_sessions(conv)
    service = MemoryTrainingService(*_args(work / "extraction", 1, "extract"))  # the pipeline's extractor
    try:
        result = service.extract_memory_entries(sessions)
    finally:
        service.close()
    extract_seconds = time.perf_counter() - started
    from memory.locomo import user_id

    speaker_of = {user_id(conv, name): name for name in conv.speakers}
    session_no = {s.session_id: int(s.session_id.rsplit("-s", 1)[1].split("-")[0]) for s in sessions}
    extracted = [{"speaker": speaker_of[c.user_id], "session": session_no.get(c.session_id),
                  "text": c.text.replace("The user", speaker_of[c.user_id]).replace("the user", speaker_of[c.user_id])}
                 for c in result.candidates]
    minilm = SentenceEncoderVectorizer("minilm")
    gold = [{"speaker": f.speaker, "session": f.session, "text": f.text} for f in conv.facts]
    if not extracted or not gold:
        sims = np.zeros((len(gold), len(extracted)))
    else:
        sims = minilm.encode([g["text"] for g in gold]) @ minilm.encode([e["text"] for e in extracted]).T

    def shares_word(g, e) -> bool:
        name = {w.lower() for w in g["speaker"].split()}
        return bool((content_words(g["text"]) & content_words(e["text"])) - name)

    matched = []
    for i, g in enumerate(gold):
        ok = [j for j, e in enumerate(extracted) if e["speaker"] == g["speaker"]
              and e["session"] == g["session"] and sims[i, j] >= 0.6 and shares_word(g, e)]
        matched.append(bool(ok))
    unsupported = []
    for j, e in enumerate(extracted):
        same = [i for i, g in enumerate(gold) if g["speaker"] == e["speaker"]]
        best = max((sims[i, j] for i in same), default=0.0)
        unsupported.append(best < 0.4)
    return {"sample_id": conv.sample_id, "sessions": len(sessions), "gold_facts": len(gold),
            "extracted": len(extracted), "coverage": float(np.mean(matched)) if matched else 0.0,
            "unsupported_rate": float(np.mean(unsupported)) if unsupported else 0.0,
            "seconds": {"extract": extract_seconds, "total": time.perf_counter() - started},
            "examples": {"unmatched_gold": [g["text"] for g, m in zip(gold, matched) if not m][:10],
                         "unsupported": [e["text"] for e, u in zip(extracted, unsupported) if u][:10]}}


_MARKED = re.compile(r"‹[^›]*›")


def short_answer(text: str, max_words: int = 30) -> str:
    """The same cut for every system's answer: special-token marks removed, the first
    non-empty line, at most ``max_words`` words (LoCoMo's F1 punishes length)."""
    lines = [ln.strip() for ln in _MARKED.sub(" ", text).splitlines() if ln.strip()]
    return " ".join(lines[0].split()[:max_words]) if lines else ""


E2E_SYSTEMS = ("chat", "chat_forced", "rag_top1", "rag_top3", "no_memory")
E2E_NAMES = {"chat": "recall loop, chat.py defaults (recall auto)", "chat_forced": "recall loop, recall forced",
             "rag_top1": "RAG peer, MiniLM top 1 in the prompt", "rag_top3": "RAG peer, MiniLM top 3 in the prompt",
             "no_memory": "no memory (the base model alone)"}


def run_e2e(conv: Conversation, work: Path) -> dict:
    """The version of the retrieval part's run answers every question with ``chat.py``'s
    defaults and with recall forced; the same base model answers with MiniLM's top 1 and top 3
    memories in the prompt (``memory.evaluation.rag_prompt``) and with none. Every system gets
    the same question (with ``INSTRUCTION``), greedy decoding, the same token budget, and the
    same cut (``short_answer``); LoCoMo's F1 per question."""
    import dataclasses

    from memory.evaluation import _base_model, chat_figures, rag_figures
    from memory.publish import resolve_current
    from memory.vector_db import MemoryVectorDB
    from recall.generation import CHAT_DEFAULTS
    from recall.published import load_recall_model

    started = time.perf_counter()
    version = resolve_current(work / "models")
    model = load_recall_model(version, precision="fp32")
    base = _base_model(version, "auto", "fp32")
    questions = _questions(conv)
    asked = [{**q, "question": f"{q['question']} {INSTRUCTION}"} for q in questions]
    db = MemoryVectorDB(Path(version) / "memory_db")
    try:
        threshold = model.config.get("recall_threshold", 0.0)
        k = int(model.config.get("memories_per_recall", 1))  # the version's, as chat.py uses it
        from memory.vectors import SentenceEncoderVectorizer

        minilm = SentenceEncoderVectorizer("minilm")
        figures = {"chat": chat_figures(model.engine, db, asked, threshold, k, encoder=minilm),
                   "chat_forced": chat_figures(model.engine, db, asked, threshold, k, encoder=minilm,
                                               defaults=dataclasses.replace(CHAT_DEFAULTS, recall="force"))}
        peer = rag_figures(base, db, asked, ks=(0, 1, 3), minilm=minilm)
        figures.update(rag_top1=peer["1"], rag_top3=peer["3"], no_memory=peer["0"])
    finally:
        db.close()
    rows = []
    for i, q in enumerate(questions):
        row = {"question": q["question"], "answer": q["expected"], "category": q["category"]}
        for name in E2E_SYSTEMS:
            got = figures[name]["per_question"][i]
            row[name] = short_answer(got["final"])
            row[f"f1_{name}"] = answer_f1(row[name], q["expected"], q["category"])
        row["recalled"] = figures["chat"]["per_question"][i]["recalled"]
        rows.append(row)
    out = {"sample_id": conv.sample_id, "version": str(version), "questions": len(rows),
           "threshold": threshold, "memories_per_recall": k, "seconds": {"total": time.perf_counter() - started},
           "per_question": rows}
    for name in E2E_SYSTEMS:
        f = figures[name]
        out[f"f1_{name}"] = float(np.mean([r[f"f1_{name}"] for r in rows])) if rows else 0.0
        out[f"by_category_f1_{name}"] = _per_category(rows, questions, f"f1_{name}")
        out[f"context_tokens_{name}"] = f["context_tokens"]
        out[f"seconds_per_answer_{name}"] = f["seconds_per_answer"]
        if "asked_rate" in f:
            out[f"asked_rate_{name}"] = f["asked_rate"]
            out[f"invented_recall_rate_{name}"] = f["invented_recall_rate"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--locomo", default=str(DEFAULT_PATH))
    ap.add_argument("--quick", action="store_true", help=f"conversation 0, first {QUICK_SESSIONS} sessions")
    ap.add_argument("--conversations", default="0", help="comma-separated indexes, or all")
    ap.add_argument("--max_sessions", type=int, default=None, help="first N sessions of each conversation")
    ap.add_argument("--parts", default="retrieval,extraction", help="retrieval,extraction,e2e")
    ap.add_argument("--epochs", type=float, default=8)
    ap.add_argument("--work", default=None, help="work root (default ~/.cache/recall_memory/bench/locomo/<mode>)")
    ap.add_argument("--results", default=None, help=f"results folder (default {RESULTS}/<mode>)")
    ap.add_argument("--fresh", action="store_true", help="delete this mode's work and results first")
    ap.add_argument("--pipeline", default="", help="extra run_training.py flags for every run, e.g. "
                    "'--embedding_model minilm --vector_distill_weight 1' (use with its own --work and --results)")
    args = ap.parse_args(argv)
    import shlex

    PIPELINE_FLAGS[:] = shlex.split(args.pipeline)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("memory", "recall", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    mode = "quick" if args.quick else "full"
    max_sessions = QUICK_SESSIONS if args.quick else args.max_sessions
    convs = load_locomo(args.locomo)
    if args.quick:
        picks = [0]
    elif args.conversations == "all":
        picks = list(range(len(convs)))
    else:
        try:
            picks = [int(x) for x in args.conversations.split(",")]
        except ValueError:
            ap.error(f"--conversations: expected indexes like 0,3 or all, got {args.conversations!r}")
        if not all(0 <= i < len(convs) for i in picks):
            ap.error(f"--conversations: {args.locomo} has conversations 0-{len(convs) - 1}")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for p in parts:
        if p not in ("retrieval", "extraction", "e2e"):
            ap.error(f"--parts: unknown part {p!r}")
    work_root = Path(args.work or Path.home() / ".cache" / "recall_memory" / "bench" / "locomo" / mode)
    results = Path(args.results or RESULTS / mode)
    if args.fresh:
        shutil.rmtree(work_root, ignore_errors=True)
        shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True, exist_ok=True)
    todo = [(i, p) for i in picks for p in parts if not (results / f"{p}-{convs[i].sample_id}.json").is_file()]
    logger.info("%d of %d (conversation, part) items to run; results in %s", len(todo), len(picks) * len(parts), results)
    started, done = time.perf_counter(), 0
    for i, part in todo:
        conv = convs[i].limited(max_sessions)
        work = work_root / conv.sample_id
        work.mkdir(parents=True, exist_ok=True)
        logger.info("[%d/%d] %s %s: %d sessions, %d gold facts, %d questions", done + 1, len(todo), part,
                    conv.sample_id, len(conv.sessions), len(conv.facts), len(conv.questions()))
        t0 = time.perf_counter()
        if part == "retrieval":
            report = run_retrieval(conv, work, args.epochs, "all" if "e2e" in parts else "recall")
        elif part == "extraction":
            report = run_extraction(conv, work)
        else:
            if not list(work.glob("models/*/manifest.json")):
                run_retrieval(conv, work, args.epochs, "all")
            report = run_e2e(conv, work)
        report.update({"mode": mode, "max_sessions": max_sessions, "date": time.strftime("%Y-%m-%d"),
                       "wall_seconds": time.perf_counter() - t0,
                       "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        tmp = results / f".{part}-{conv.sample_id}.json.tmp"
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(results / f"{part}-{conv.sample_id}.json")
        done += 1
        rate = (time.perf_counter() - started) / done
        logger.info("%s %s done in %.0fs; %d left, ETA %.0f min", part, conv.sample_id, time.perf_counter() - t0,
                    len(todo) - done, rate * (len(todo) - done) / 60)
    print(summarize(results))
    return 0


def summarize(results: Path) -> str:
    """Markdown tables of every result file in ``results`` (pooled over conversations)."""
    lines = []
    ret = [json.loads(p.read_text()) for p in sorted(results.glob("retrieval-*.json"))]
    if ret:
        lines += ["| retriever | " + " | ".join(r["sample_id"] for r in ret) + " | pooled recall@1 | recall@5 | recall@10 |",
                  "|---|" + "---|" * (len(ret) + 3)]
        for name in ("trained_recall", "untrained_last_token", "minilm_rag", "bm25"):
            ranks = [q["rank"] or 10**9 for r in ret for q in r[name]["per_question"]]
            per = " | ".join(f"{r[name]['recall_at_5']:.3f}" for r in ret)
            n = max(len(ranks), 1)
            lines.append(f"| {name} | {per} | {sum(x == 1 for x in ranks) / n:.3f} | "
                         f"{sum(x <= 5 for x in ranks) / n:.3f} | {sum(x <= 10 for x in ranks) / n:.3f} |")
        lines.append(f"\n({sum(r['questions'] for r in ret)} questions, {sum(r['memories'] for r in ret)} gold "
                     "memories; per-conversation columns are recall@5)\n")
    ext = [json.loads(p.read_text()) for p in sorted(results.glob("extraction-*.json"))]
    if ext:
        lines += ["| conversation | gold facts | extracted | gold coverage | unsupported | seconds |", "|---|---|---|---|---|---|"]
        for e in ext:
            lines.append(f"| {e['sample_id']} | {e['gold_facts']} | {e['extracted']} | {e['coverage']:.3f} | "
                         f"{e['unsupported_rate']:.3f} | {e['seconds']['extract']:.0f} |")
        lines.append("")
    e2e = [json.loads(p.read_text()) for p in sorted(results.glob("e2e-*.json"))]
    e2e = [e for e in e2e if "f1_chat" in e]  # the current report's shape
    if e2e:
        lines += e2e_table(e2e)
    return "\n".join(lines)


def e2e_table(e2e: List[dict]) -> List[str]:
    """One row per system, pooled over the conversations' questions: F1 overall and per category,
    context tokens and seconds per answer (question-weighted means)."""
    cats = sorted({c for e in e2e for c in e["by_category_f1_chat"]})
    n = sum(e["questions"] for e in e2e)
    lines = [f"{n} questions of {', '.join(e['sample_id'] for e in e2e)}", "",
             "| system | F1 | " + " | ".join(f"F1 {c}" for c in cats) + " | recalled | context tokens | s/answer |",
             "|---|---|" + "---|" * len(cats) + "---|---|---|"]
    for name in E2E_SYSTEMS:
        def pooled(key):
            return sum(e[key] * e["questions"] for e in e2e) / max(n, 1)

        per_cat = []
        for c in cats:
            parts = [(e[f"by_category_f1_{name}"][c]["mean"], e[f"by_category_f1_{name}"][c]["n"]) for e in e2e
                     if c in e[f"by_category_f1_{name}"] and e[f"by_category_f1_{name}"][c]["n"]]
            total = sum(k for _, k in parts)
            per_cat.append(f"{sum(m * k for m, k in parts) / total:.3f}" if total else "–")
        asked = f"{pooled(f'asked_rate_{name}'):.3f}" if f"asked_rate_{name}" in e2e[0] else ""
        lines.append(f"| {E2E_NAMES[name]} | {pooled(f'f1_{name}'):.3f} | " + " | ".join(per_cat) +
                     f" | {asked} | {pooled(f'context_tokens_{name}'):.0f} | {pooled(f'seconds_per_answer_{name}'):.2f} |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
