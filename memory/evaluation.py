"""The evaluation harness behind ``evaluate.py``: retrieval of held-out questions, and,
for a published version, the full recall loop.

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
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from memory.recall_step import COMPLETE_MARKER
from memory.token_manager import neutralize, stop_ids
from memory.vector_db import MemoryVectorDB
from recall.text_embedding_train import format_query, retrieval_metrics

LIVE = ("pending", "active")
HELDOUT = Path(__file__).resolve().parent / "data" / "heldout_prompts.json"
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
    """The published ``models/current`` version when there is one, else the newest
    complete step-1 output (``runs/*/recall`` with its metrics written)."""
    from memory.publish import VersionError, resolve_current

    try:
        return str(resolve_current(Path(output_dir) / "models"))
    except VersionError:
        pass
    candidates = sorted(Path(output_dir).glob(f"runs/*/recall/{COMPLETE_MARKER}"))
    if not candidates:
        raise FileNotFoundError(f"{output_dir}: no trained state found (looked for runs/*/recall/{COMPLETE_MARKER})")
    return str(candidates[-1].parent)


def by_user(questions) -> Dict[Optional[str], List[dict]]:
    """Questions grouped by ``user_id`` (None: every user's memories), in order."""
    groups: Dict[Optional[str], List[dict]] = {}
    for q in questions:
        groups.setdefault(q.get("user_id"), []).append(q)
    return groups


def expected_in_text(question: dict, record) -> bool:
    """The default hit rule: the memory's text contains ``expected`` (case-insensitive)."""
    return question["expected"].lower() in record.text.lower()


def _ranks(questions, db: MemoryVectorDB, scorer: Callable[[List[str], list], np.ndarray],
           is_hit: Callable[[dict, object], bool] = expected_in_text) -> List[dict]:
    """Per question: rank of the first memory that ``is_hit`` (0 if none in its user's memories)."""
    rows = []
    for user, qs in by_user(questions).items():
        records = db.records(user_id=user, statuses=LIVE)
        if not records:
            rows += [{"question": q["question"], "rank": 0, "top": []} for q in qs]
            continue
        scores = scorer([q["question"] for q in qs], records)
        for q, s in zip(qs, scores):
            order = np.argsort(-s, kind="stable")
            hit = next((r + 1 for r, i in enumerate(order) if is_hit(q, records[i])), 0)
            rows.append({"question": q["question"], "expected": q["expected"], "rank": hit,
                         "top": [records[i].text for i in order[:K]]})
    return rows


def _metrics(rows) -> Dict[str, float]:
    ranks = [r["rank"] if r["rank"] else 10**9 for r in rows]
    return retrieval_metrics(ranks)


def _compare_retrievers(report: dict, questions, db: MemoryVectorDB, trained, base_embed,
                        is_hit: Callable[[dict, object], bool] = expected_in_text, extra: Sequence = (),
                        minilm=None) -> dict:
    """Fill ``report`` with the retrievers' ranks, in the same run: ``trained(texts,
    records)`` scores, the base model's PromptEOL vectors (``base_embed(texts)``, the same
    space as the default keys), all-MiniLM-L6-v2 on question and memory text, and any
    ``extra`` ``(name, scorer)`` pairs."""
    from memory.vectors import SentenceEncoderVectorizer

    minilm = minilm or SentenceEncoderVectorizer("minilm")

    def untrained(texts, records):
        return base_embed(texts) @ base_embed([r.text for r in records]).T

    def rag(texts, records):
        return minilm.encode(texts) @ minilm.encode([r.text for r in records]).T

    scorers = [("trained_recall", trained), ("untrained_last_token", untrained), ("minilm_rag", rag), *extra]
    for name, scorer in scorers:
        start = time.perf_counter()
        rows = _ranks(questions, db, scorer, is_hit)
        report[name] = {**_metrics(rows), "seconds": time.perf_counter() - start, "per_question": rows}
    return report


def is_version(model_dir) -> bool:
    from memory.publish import MANIFEST

    return (Path(model_dir) / MANIFEST).is_file()


def step1_scorers(model_dir, db: MemoryVectorDB, *, device="auto", precision="auto"):
    """``(trained, base_embed)`` for a step-1 run directory: the trained ``<recall>`` query
    scored against the DB's keys, and the untrained base model's PromptEOL vectors."""
    from recall.get_text_embedding import TEMPLATES, extract_last_token_embedding
    from recall.text_embedding_train import load_recall_model

    model, tokenizer, loaded, args = load_recall_model(model_dir, device=device, precision=precision)

    @torch.no_grad()
    def trained(texts, records):
        keys = torch.from_numpy(db.vectors([r.id for r in records]))
        out = []
        for start in range(0, len(texts), 32):
            enc = tokenizer([format_query(tokenizer, t) for t in texts[start:start + 32]], add_special_tokens=False,
                            padding=True, return_tensors="pt").to(loaded.runtime.device)
            with loaded.runtime.autocast():
                out.append(model(enc["input_ids"], enc["attention_mask"]).float().cpu())
        return (torch.cat(out) @ keys.T).numpy()

    def base_embed(texts):
        with model.lm.disable_adapter():
            return extract_last_token_embedding(
                model.lm, tokenizer, texts, template=TEMPLATES["prompteol"],
                autocast_dtype=loaded.runtime.autocast_dtype).numpy()

    return trained, base_embed


def evaluate_retrieval(output_dir, model_dir, questions_path, *, device="auto", precision="auto",
                       memories_per_recall: Optional[int] = None, heldout_prompts: Optional[List[str]] = None,
                       heldout_source: Optional[str] = None) -> dict:
    if is_version(model_dir):
        return evaluate_version(model_dir, questions_path, device=device, precision=precision,
                                memories_per_recall=memories_per_recall, heldout_prompts=heldout_prompts,
                                heldout_source=heldout_source)
    questions = load_questions(questions_path)
    db = MemoryVectorDB(Path(output_dir) / "memory_db")
    try:
        trained, base_embed = step1_scorers(model_dir, db, device=device, precision=precision)
        report = {"model_dir": str(model_dir), "questions": str(questions_path), "n": len(questions), "k": K}
        _compare_retrievers(report, questions, db, trained, base_embed)
        return report
    finally:
        db.close()


def format_table(report: dict) -> str:
    lines = [f"{report['n']} questions, model {report['model_dir']}", "",
             "| retriever | recall@1 | recall@5 | MRR |", "|---|---|---|---|"]
    for name in ("trained_recall", "untrained_last_token", "minilm_rag", "fused_recall_minilm"):
        if name not in report:
            continue
        m = report[name]
        lines.append(f"| {name} | {m['recall_at_1']:.3f} | {m['recall_at_5']:.3f} | {m['mrr']:.3f} |")
    if "decoding" in report:
        d, a, f = report["decoding"], report["answers"], report["forgetting"]
        em = "n/a" if d["decode_exact_match"] is None else f"{d['decode_exact_match']:.3f}"
        lines += ["", "| recall loop | value |", "|---|---|",
                  f"| decode_exact_match ({d['n']} memories) | {em} |",
                  f"| answer_hit_rate (forced recall, {a['n']} questions, up to {a.get('memories_per_recall', 1)} "
                  f"memories) | {a['answer_hit_rate']:.3f} |",
                  f"| final answer contains the expected answer | {a['final_hit_rate']:.3f} |"
                  if "final_hit_rate" in a else None,
                  f"| answer_hit_rate with the best memory alone | {report['answers_top1']['answer_hit_rate']:.3f} |"
                  if "answers_top1" in report else None,
                  f"| asked for <recall> unprompted | {report['answers_unforced']['asked_rate']:.3f} |",
                  f"| forgetting: greedy agreement with base ({f['prompts']} held-out prompts) | "
                  f"{f['greedy_agreement']:.3f} |",
                  f"| forgetting: mean KL(base, trained) per token | {f['mean_kl']:.4f} |"]
    if "chat" in report:
        lines += ["", answer_table(report)]
    return "\n".join(line for line in lines if line is not None)


def answer_table(report: dict) -> str:
    """The answer a user reads: chat.py's defaults next to the RAG peer and no memory, one run."""
    c, g = report["chat"], report["general"]
    lines = [f"The answer the user reads ({c['n']} questions; general prompts: {g['n']})", "",
             "| system | final_hit_rate | asked_rate | invented_recall_rate | context tokens | s/answer |",
             "|---|---|---|---|---|---|",
             f"| chat.py defaults (recall {c.get('recall', 'auto')}) | {c['final_hit_rate']:.3f} | {c['asked_rate']:.3f} | "
             f"{c['invented_recall_rate']:.3f} | {c['context_tokens']:.0f} | {c['seconds_per_answer']:.2f} |"]
    for k, v in report["rag_peer"]["by_k"].items():
        lines.append(f"| RAG peer, MiniLM top {k} in the prompt | {v['final_hit_rate']:.3f} | | | "
                     f"{v['context_tokens']:.0f} | {v['seconds_per_answer']:.2f} |")
    m = report["no_memory"]
    lines += [f"| no memory | {m['final_hit_rate']:.3f} | | | {m['context_tokens']:.0f} | {m['seconds_per_answer']:.2f} |",
              "", f"general prompts: false_recall_rate {g['false_recall_rate']:.3f}"]
    return "\n".join(lines)


# ------------------------------------------------------------------ published versions
def _base_model(version_dir, device, precision):
    from recall.model_loading import load_model_and_tokenizer

    manifest = json.loads((Path(version_dir) / "manifest.json").read_text())
    loc, gguf = manifest["base_location"], manifest.get("base_gguf_file")
    return load_model_and_tokenizer(str(Path(loc, gguf)) if gguf else loc, device=device, precision=precision)


def decode_exact_match(engine, db: MemoryVectorDB) -> dict:
    """Greedy decoding from each active memory's own vector equals its text (whitespace-normalised)."""
    from memory.decoding_step import exact_match_rate, normalize_ws

    records = db.records(statuses=("active",))
    if not records:
        return {"decode_exact_match": None, "n": 0, "failures": []}
    decoded = engine.decode_memories(db.vectors([r.id for r in records]))
    texts = [neutralize(r.text, engine.tokenizer) for r in records]
    return {"decode_exact_match": exact_match_rate(decoded, texts), "n": len(texts),
            "failures": [{"text": t, "decoded": d} for t, d in zip(texts, decoded)
                         if normalize_ws(t) != normalize_ws(d)]}


def answer_hit_rate(engine, db: MemoryVectorDB, questions, threshold: float, force_recall: bool = True,
                    memories_per_recall: int = 1, max_new_tokens: int = 128) -> dict:
    """The recall loop on each question (the question's user's memories), generating the whole
    answer: a hit when the decoded recall (every memory the search injected, up to
    ``memories_per_recall``) contains ``expected``; ``final_hit_rate``: when the answer the
    user reads (the text after the recall spans) contains it."""
    from recall.generation import NO_REPEAT_NGRAM
    from memory.search import db_search

    rows = []
    for user, qs in by_user(questions).items():
        answers = engine.generate([q["question"] for q in qs], db_search(db, user, max(1, memories_per_recall)),
                                  force_recall=force_recall, max_new_tokens=max_new_tokens, threshold=threshold,
                                  max_recalls=1, memories_per_recall=memories_per_recall,
                                  no_repeat_ngram=NO_REPEAT_NGRAM)  # as chat.py answers
        for q, a in zip(qs, answers):
            decoded = " ".join(r.decoded for r in a.recalls)
            want = q["expected"].lower()
            rows.append({"question": q["question"], "expected": q["expected"], "decoded": decoded,
                         "retrieved": [r.stored_text for r in a.recalls], "scores": [r.score for r in a.recalls],
                         "final": a.final, "hit": want in decoded.lower(), "final_hit": want in a.final.lower()})
    n = max(len(rows), 1)
    return {"answer_hit_rate": sum(r["hit"] for r in rows) / n,
            "final_hit_rate": sum(r["final_hit"] for r in rows) / n,
            "memories_per_recall": memories_per_recall,
            "injected_per_answer": sum(sum(m is not None for m in r["retrieved"]) for r in rows) / n,
            "n": len(rows), "per_question": rows}


@torch.no_grad()
def forgetting(base, trained_lm, tokenizer, prompts, max_new_tokens: int = 48) -> dict:
    """On prompts never trained on, with no <recall>: the base model's greedy answer, then
    both models teacher-forced on it. Reports mean per-token KL(base || trained) over the
    base vocabulary and the fraction of positions where the greedy tokens agree."""
    from memory.sft_data import chat_prompt, greedy_answers

    answers = greedy_answers(base.model, base.tokenizer, prompts, max_new_tokens,
                             autocast_dtype=base.runtime.autocast_dtype)
    kls, agree, n = 0.0, 0, 0
    vocab = base.model.get_output_embeddings().weight.shape[0]
    for prompt, answer in zip(prompts, answers):
        p_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(neutralize(answer, tokenizer), add_special_tokens=False)["input_ids"]
        if not a_ids:
            continue
        ids = torch.tensor([p_ids + a_ids], device=base.runtime.device)
        span = slice(len(p_ids) - 1, len(p_ids) + len(a_ids) - 1)
        lp_base = torch.log_softmax(base.model(ids).logits[0, span].float(), -1)
        lp_trained = torch.log_softmax(trained_lm(ids).logits[0, span, :vocab].float(), -1)
        kls += float((lp_base.exp() * (lp_base - lp_trained)).sum())
        agree += int((lp_base.argmax(-1) == lp_trained.argmax(-1)).sum())
        n += len(a_ids)
    return {"mean_kl": kls / max(n, 1), "greedy_agreement": agree / max(n, 1), "tokens": n, "prompts": len(prompts)}


def evaluate_version(version_dir, questions_path, *, device="auto", precision="auto",
                     heldout_prompts: Optional[List[str]] = None, memories_per_recall: Optional[int] = None,
                     heldout_source: Optional[str] = None) -> dict:
    """Retrieval (trained ``<recall>`` vs the untrained base and MiniLM), decode exact
    match, answer hit rate and forgetting for a published version, on its own DB snapshot.
    ``heldout_prompts`` (default: ``memory/data/heldout_prompts.json``) are the general prompts;
    ``heldout_source`` names where they came from in the report (``general.prompts``)."""
    from memory.sft_data import read_prompts
    from recall.get_text_embedding import TEMPLATES, extract_last_token_embedding
    from recall.published import load_recall_model

    model = load_recall_model(version_dir, device=device, precision=precision)
    default_user = model.config.get("default_user_id", "default")  # a question without user_id asks as this user
    questions = [{**q, "user_id": q.get("user_id", default_user)} for q in load_questions(questions_path)]
    engine = model.engine
    base = _base_model(version_dir, device, precision)
    db = MemoryVectorDB(Path(version_dir) / "memory_db")
    try:
        keys = lambda records: db.vectors([r.id for r in records])  # noqa: E731

        def trained(texts, records):
            return engine.query_vectors(texts) @ keys(records).T

        def base_embed(texts):
            return extract_last_token_embedding(base.model, base.tokenizer, texts, template=TEMPLATES["prompteol"],
                                                autocast_dtype=base.runtime.autocast_dtype).numpy()

        from memory.search import _standardised
        from memory.vectors import SentenceEncoderVectorizer

        minilm = SentenceEncoderVectorizer("minilm")

        def fused(texts, records):  # memory.search.FusedSearch's order (chat.py --retrieval fused)
            return _standardised(trained(texts, records)) + _standardised(
                minilm.encode(texts) @ minilm.encode([r.text for r in records]).T)

        report = {"model_dir": str(version_dir), "questions": str(questions_path), "n": len(questions), "k": K}
        _compare_retrievers(report, questions, db, trained, base_embed, extra=[("fused_recall_minilm", fused)],
                            minilm=minilm)
        start = time.perf_counter()
        report["decoding"] = decode_exact_match(engine, db)
        threshold = model.config.get("recall_threshold", 0.0)
        k = int(model.config.get("memories_per_recall", 1) if memories_per_recall is None else memories_per_recall)
        report["answers"] = answer_hit_rate(engine, db, questions, threshold, memories_per_recall=k)
        if k > 1:  # the single best memory, in the same run
            report["answers_top1"] = answer_hit_rate(engine, db, questions, threshold, memories_per_recall=1)
        report["answers_unforced"] = _asked_rate(engine, db, questions, threshold)
        # the answer the user reads, next to the peer a user would pick instead, in the same run
        report["chat"] = chat_figures(engine, db, questions, threshold, k, encoder=minilm)
        peer = rag_figures(base, db, questions, ks=(0, 1, 2, 3), minilm=minilm)
        no_memory = peer.pop("0")
        report["rag_peer"] = {"final_hit_rate": max(v["final_hit_rate"] for v in peer.values()),
                              "n": len(questions), "by_k": peer}
        report["no_memory"] = no_memory
        prompts = heldout_prompts if heldout_prompts is not None else read_prompts(HELDOUT)
        report["general"] = general_figures(engine, db, list(by_user(questions)), prompts, threshold, encoder=minilm)
        report["general"]["prompts"] = heldout_source or (
            "memory/data/heldout_prompts.json" if heldout_prompts is None else "given")
        report["forgetting"] = forgetting(base, model.loaded.model, engine.tokenizer, prompts)
        report["decoding_seconds"] = time.perf_counter() - start
        return report
    finally:
        db.close()


RAG_HEADER = "What you remember:"


def rag_prompt(tokenizer, memories: Sequence[str], question: str) -> str:
    """The RAG peer's prompt: the memories pasted into the user turn above the question (the
    stronger of the two layouts measured on the dev set: a system message with the same list
    answered 0.347 against 0.551 with the top memory)."""
    from memory.sft_data import chat_prompt

    if not memories:
        return chat_prompt(tokenizer, question)
    return chat_prompt(tokenizer, RAG_HEADER + "\n" + "\n".join(f"- {m}" for m in memories) + f"\n\n{question}")


def _hit(question: dict, text: str) -> bool:
    return question["expected"].lower() in text.lower()


def chat_figures(engine, db: MemoryVectorDB, questions, threshold: float, memories_per_recall: int = 1,
                 defaults=None, encoder=None) -> dict:
    """The answer a ``chat.py`` user reads, with its defaults (``CHAT_DEFAULTS``: recall "auto",
    nothing forced), per question: ``final_hit`` (``expected`` in the text after the recall
    spans), ``asked`` (a recall span showed a memory) and ``invented`` (a span whose text,
    whitespace-normalised, is no stored memory of that user: read from the generated text)."""
    from memory.decoding_step import normalize_ws
    from memory.search import make_search
    from recall.generation import CHAT_DEFAULTS, recall_spans

    d = defaults or CHAT_DEFAULTS
    rows, seconds = [], 0.0
    for user, qs in by_user(questions).items():
        stored = {normalize_ws(neutralize(r.text, engine.tokenizer))
                  for r in db.records(user_id=user, statuses=("active",))}
        search = make_search(db, user, max(d.top_k, memories_per_recall), d.retrieval, encoder)
        if hasattr(search, "bank"):
            search.bank()  # the encoder's vectors of the memories: an index's work, not an answer's
        start = time.perf_counter()
        answers = engine.generate([q["question"] for q in qs], search,
                                  recall=d.recall, threshold=threshold, memories_per_recall=memories_per_recall,
                                  max_new_tokens=d.max_new_tokens, no_repeat_ngram=d.no_repeat_ngram, verify=d.verify)
        seconds += time.perf_counter() - start
        for q, a in zip(qs, answers):
            spans = recall_spans(a.text)
            rows.append({"question": q["question"], "expected": q["expected"], "final": a.final,
                         "recalled": [r.decoded for r in a.recalls if r.memory_id is not None],
                         "verified": [r.verified for r in a.recalls if r.memory_id is not None],
                         "probe_score": None if a.probe is None else a.probe.score,
                         "final_hit": _hit(q, a.final), "asked": a.recalled(),
                         "invented": any(normalize_ws(x) not in stored for x in spans),
                         "context_tokens": a.context_tokens})
    return _rates(rows, seconds, recall=d.recall, retrieval=d.retrieval)


def _rates(rows: List[dict], seconds: float, **extra) -> dict:
    n = max(len(rows), 1)
    out = {"final_hit_rate": sum(r["final_hit"] for r in rows) / n}
    if rows and "asked" in rows[0]:
        out["asked_rate"] = sum(r["asked"] for r in rows) / n
        out["invented_recall_rate"] = sum(r["invented"] for r in rows) / n
    out.update(n=len(rows), context_tokens=sum(r["context_tokens"] for r in rows) / n,
               seconds_per_answer=seconds / n, **extra, per_question=rows)
    return out


def rag_figures(base, db: MemoryVectorDB, questions, ks: Sequence[int] = (1, 2, 3), max_new_tokens: Optional[int] = None,
                minilm=None) -> Dict[str, dict]:
    """The simplest thing a user would pick instead: the same base model with the top-k
    all-MiniLM-L6-v2 memories of the question's user pasted into the prompt (``rag_prompt``),
    greedy, for each k (0: no memory). Times include encoding the questions, not the memories
    (an index holds them, as the memory DB holds the recall loop's vectors)."""
    from recall.generation import CHAT_DEFAULTS

    from memory.vectors import SentenceEncoderVectorizer

    minilm = minilm or SentenceEncoderVectorizer("minilm")
    tok = base.tokenizer
    max_new_tokens = max_new_tokens or CHAT_DEFAULTS.max_new_tokens
    groups = []
    for user, qs in by_user(questions).items():
        records = db.records(user_id=user, statuses=("active",))
        keys = minilm.encode([r.text for r in records]) if records else None
        groups.append((qs, records, keys))
    out = {}
    for k in ks:
        rows, seconds = [], 0.0
        for qs, records, keys in groups:
            start = time.perf_counter()
            texts = [q["question"] for q in qs]
            if k and records:
                scores = minilm.encode(texts) @ keys.T
                picked = [[records[i].text for i in np.argsort(-s, kind="stable")[:k]] for s in scores]
            else:
                picked = [[] for _ in qs]
            prompts = [rag_prompt(tok, m, t) for m, t in zip(picked, texts)]
            answers = _greedy(base, prompts, max_new_tokens)
            seconds += time.perf_counter() - start
            for q, p, m, a in zip(qs, prompts, picked, answers):
                rows.append({"question": q["question"], "expected": q["expected"], "memories": m, "final": a,
                             "final_hit": _hit(q, a), "context_tokens": len(tok(p, add_special_tokens=False)["input_ids"])})
        out[str(k)] = _rates(rows, seconds, k=k)
    return out


@torch.no_grad()
def _greedy(loaded, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16) -> List[str]:
    """Plain greedy answers of a loaded model to ready-made prompts, in order."""
    from recall.get_text_embedding import autocast

    tok, model = loaded.tokenizer, loaded.model
    eos = stop_ids(tok)
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = tok(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True, padding_side="left",
                  add_special_tokens=False).to(loaded.runtime.device)
        with autocast(loaded.runtime.device, loaded.runtime.autocast_dtype):
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id)
        out += [tok.decode(g[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for g in gen]
    return out


def general_figures(engine, db: MemoryVectorDB, users: Sequence[Optional[str]], prompts: Sequence[str],
                    threshold: float, defaults=None, encoder=None) -> dict:
    """``chat.py``'s defaults on general prompts no memory answers (never trained on), asked by
    each user: ``false_recall_rate``, the share whose answer showed a recalled memory."""
    from memory.search import make_search
    from recall.generation import CHAT_DEFAULTS

    d = defaults or CHAT_DEFAULTS
    recalled = []
    for user in users:
        search = make_search(db, user, d.top_k, d.retrieval, encoder)
        answers = engine.generate(list(prompts), search, recall=d.recall, threshold=threshold,
                                  max_new_tokens=1)  # the probe decides; the first token shows what it did
        recalled += [{"prompt": p, "user_id": user, "recalled": a.recalled(),
                      "probe_score": None if a.probe is None else a.probe.score} for p, a in zip(prompts, answers)]
    n = max(len(recalled), 1)
    return {"false_recall_rate": sum(r["recalled"] for r in recalled) / n, "n": len(recalled),
            "per_prompt": recalled}


def _asked_rate(engine, db, questions, threshold) -> dict:
    """Without --force-recall: how often the model emits <recall> by itself."""
    from memory.search import db_search

    asked = 0
    for user, qs in by_user(questions).items():
        answers = engine.generate([q["question"] for q in qs], db_search(db, user, 1), max_new_tokens=32,
                                  threshold=threshold, max_recalls=1, stop_after_recall=True)
        asked += sum(a.asked() for a in answers)
    return {"asked_rate": asked / max(len(questions), 1), "n": len(questions)}
