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
  by the recall loop (forced recall, top 1) and by the RAG peer (MiniLM top 3, and top 1,
  pasted into the prompt of the same base model), and by the base model with no memory; every answer is cut
  the same way (``short_answer``: first line, at most 30 words); LoCoMo's F1.
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


def run_e2e(conv: Conversation, work: Path, max_new_tokens: int = 24) -> dict:
    from memory.evaluation import _base_model
    from memory.publish import resolve_current
    from memory.sft_data import chat_prompt, greedy_answers
    from memory.vector_db import MemoryVectorDB
    from memory.vectors import SentenceEncoderVectorizer
    from recall.published import db_search, load_recall_model

    started = time.perf_counter()
    version = resolve_current(work / "models")
    model = load_recall_model(version, precision="fp32")
    base = _base_model(version, "auto", "fp32")
    questions = _questions(conv)
    asked = [f"{q['question']} {INSTRUCTION}" for q in questions]
    db = MemoryVectorDB(Path(version) / "memory_db")
    try:
        threshold = model.config.get("recall_threshold", 0.0)
        t0 = time.perf_counter()
        per_recall = int(model.config.get("memories_per_recall", 1))  # the version's, as chat.py uses it
        answers = model.engine.generate(asked, db_search(db, conv.sample_id, per_recall), force_recall=True,
                                        max_new_tokens=max_new_tokens + 48 * per_recall, threshold=threshold,
                                        max_recalls=1, memories_per_recall=per_recall)
        recall_seconds = time.perf_counter() - t0
        records = db.records(user_id=conv.sample_id, statuses=("active",))
        minilm = SentenceEncoderVectorizer("minilm")
        scores = minilm.encode([q["question"] for q in questions]) @ minilm.encode([r.text for r in records]).T
        def rag_prompts(k):
            return [chat_prompt(base.tokenizer, "What you remember:\n" + "\n".join(
                f"- {records[i].text}" for i in np.argsort(-s)[:k]) + f"\n\n{q}") for q, s in zip(asked, scores)]

        t0 = time.perf_counter()
        rag = greedy_answers(base.model, base.tokenizer, rag_prompts(3), max_new_tokens)
        rag_seconds = time.perf_counter() - t0
        rag1 = greedy_answers(base.model, base.tokenizer, rag_prompts(1), max_new_tokens)
        plain = greedy_answers(base.model, base.tokenizer, [chat_prompt(base.tokenizer, p) for p in asked],
                               max_new_tokens)
    finally:
        db.close()
    rows = []
    for q, a, r, r1, p in zip(questions, answers, rag, rag1, plain):
        a_final, r, r1, p = short_answer(a.final), short_answer(r), short_answer(r1), short_answer(p)
        rows.append({"question": q["question"], "answer": q["expected"], "category": q["category"],
                     "recall_loop": a_final, "recalled": [x.decoded for x in a.recalls], "rag": r, "rag_top1": r1,
                     "no_memory": p, "f1_rag_top1": answer_f1(r1, q["expected"], q["category"]),
                     "f1_recall_loop": answer_f1(a_final, q["expected"], q["category"]),
                     "f1_rag": answer_f1(r, q["expected"], q["category"]),
                     "f1_no_memory": answer_f1(p, q["expected"], q["category"])})
    out = {"sample_id": conv.sample_id, "version": str(version), "questions": len(rows),
           "seconds": {"recall_loop": recall_seconds, "rag": rag_seconds, "total": time.perf_counter() - started},
           "per_question": rows}
    for key in ("recall_loop", "rag", "rag_top1", "no_memory"):
        out[f"f1_{key}"] = float(np.mean([r[f"f1_{key}"] for r in rows])) if rows else 0.0
        out[f"by_category_f1_{key}"] = _per_category(rows, questions, f"f1_{key}")
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
    if e2e:
        lines += ["| conversation | questions | F1 recall loop (top 1) | F1 RAG peer, MiniLM top 3 in the prompt | "
                  "F1 RAG peer, top 1 | F1 no memory |", "|---|---|---|---|---|---|"]
        for e in e2e:
            lines.append(f"| {e['sample_id']} | {e['questions']} | {e['f1_recall_loop']:.3f} | {e['f1_rag']:.3f} | "
                         f"{e.get('f1_rag_top1', float('nan')):.3f} | {e['f1_no_memory']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
