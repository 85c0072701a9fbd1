"""The evaluation harness behind ``evaluate.py``: retrieval of held-out questions.

Three retrievers over the same memories (each question searches its own user's
pending/active memories), in the same run:
- ``trained_recall``: the trained ``<recall>`` state of ``format_query(question)``;
- ``untrained_last_token``: the base model's PromptEOL last-token vector (same space as the keys);
- ``minilm_rag``: all-MiniLM-L6-v2 on question and memory text (the classic RAG peer).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from memory.recall_step import COMPLETE_MARKER
from memory.vector_db import MemoryVectorDB
from recall.text_embedding_train import format_query, retrieval_metrics

LIVE = ("pending", "active")
K = 5


class QuestionsFormatError(ValueError):
    pass


def load_questions(path) -> List[dict]:
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise QuestionsFormatError(f"{file}: file not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QuestionsFormatError(f"{file}: not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(data, list) or not data:
        raise QuestionsFormatError(f"{file}: expected a non-empty JSON list of questions")
    for i, item in enumerate(data):
        for field in ("question", "expected"):
            if not isinstance(item, dict) or not isinstance(item.get(field), str) or not item[field].strip():
                raise QuestionsFormatError(f"{file}: [{i}].{field}: expected a non-empty string")
        if "user_id" in item and not isinstance(item["user_id"], str):
            raise QuestionsFormatError(f"{file}: [{i}].user_id: expected a string")
    return data


def find_model_dir(output_dir) -> str:
    """The newest complete step-1 output (``runs/*/recall`` with its metrics written)."""
    candidates = sorted(Path(output_dir).glob(f"runs/*/recall/{COMPLETE_MARKER}"))
    if not candidates:
        raise FileNotFoundError(f"{output_dir}: no trained state found (looked for runs/*/recall/{COMPLETE_MARKER})")
    return str(candidates[-1].parent)


def _ranks(questions, db: MemoryVectorDB, scorer: Callable[[List[str], List[str]], np.ndarray]) -> List[dict]:
    """Per question: rank of the first memory containing ``expected`` (0 if none in its user's memories)."""
    rows = []
    by_user: Dict[Optional[str], List] = {}
    for q in questions:
        by_user.setdefault(q.get("user_id"), []).append(q)
    for user, qs in by_user.items():
        records = db.records(user_id=user, statuses=LIVE)
        if not records:
            rows += [{"question": q["question"], "rank": 0, "top": []} for q in qs]
            continue
        scores = scorer([q["question"] for q in qs], records)
        for q, s in zip(qs, scores):
            order = np.argsort(-s)
            ranked = [records[i].text for i in order]
            hit = next((r + 1 for r, t in enumerate(ranked) if q["expected"].lower() in t.lower()), 0)
            rows.append({"question": q["question"], "expected": q["expected"], "rank": hit, "top": ranked[:K]})
    return rows


def _metrics(rows) -> Dict[str, float]:
    ranks = [r["rank"] if r["rank"] else 10**9 for r in rows]
    return retrieval_metrics(ranks)


def evaluate_retrieval(output_dir, model_dir, questions_path, *, device="auto", precision="auto") -> dict:
    from memory.vectors import SentenceEncoderVectorizer
    from recall.get_text_embedding import TEMPLATES, extract_last_token_embedding
    from recall.text_embedding_train import load_recall_model

    questions = load_questions(questions_path)
    db = MemoryVectorDB(Path(output_dir) / "memory_db")
    try:
        model, tokenizer, loaded, args = load_recall_model(model_dir, device=device, precision=precision)
        key_vectors = lambda records: torch.from_numpy(db.vectors([r.id for r in records]))  # noqa: E731

        @torch.no_grad()
        def trained(texts, records):
            enc = tokenizer([format_query(tokenizer, t) for t in texts], add_special_tokens=False,
                            padding=True, return_tensors="pt").to(loaded.runtime.device)
            with loaded.runtime.autocast():
                q = model(enc["input_ids"], enc["attention_mask"]).float().cpu()
            return (q @ key_vectors(records).T).numpy()

        def untrained(texts, records):
            # the base model's PromptEOL vectors for question and memory alike (= the default keys)
            embed = lambda xs: extract_last_token_embedding(  # noqa: E731
                model.lm, tokenizer, xs, template=TEMPLATES["prompteol"], autocast_dtype=loaded.runtime.autocast_dtype)
            with model.lm.disable_adapter():
                return (embed(texts) @ embed([r.text for r in records]).T).numpy()

        minilm = SentenceEncoderVectorizer("minilm")

        def rag(texts, records):
            return minilm.encode(texts) @ minilm.encode([r.text for r in records]).T

        report = {"model_dir": str(model_dir), "questions": str(questions_path), "n": len(questions), "k": K}
        for name, scorer in (("trained_recall", trained), ("untrained_last_token", untrained), ("minilm_rag", rag)):
            start = time.perf_counter()
            rows = _ranks(questions, db, scorer)
            report[name] = {**_metrics(rows), "seconds": time.perf_counter() - start, "per_question": rows}
        return report
    finally:
        db.close()


def format_table(report: dict) -> str:
    lines = [f"{report['n']} questions, model {report['model_dir']}", "",
             "| retriever | recall@1 | recall@5 | MRR |", "|---|---|---|---|"]
    for name in ("trained_recall", "untrained_last_token", "minilm_rag"):
        m = report[name]
        lines.append(f"| {name} | {m['recall_at_1']:.3f} | {m['recall_at_5']:.3f} | {m['mrr']:.3f} |")
    return "\n".join(lines)
