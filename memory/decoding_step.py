"""Step 3.2 orchestration: memory decoding on top of the trained ``<recall>`` (step 3.1).

1. step 1's state is loaded onto a copy of the base model: with an activated adapter (the
   default) its token rows are merged and its LoRA is continued; with ``adapter_scope all``
   its LoRA and rows are merged;
2. samples are drawn afresh every epoch, per memory ``mix`` = memory:sandwich:sft:answer
   (default 1:1:2:2; an activated adapter drops the pure SFT samples, which never reach it):
   - ``memory``:   a cue of the memory (a question, its source turn, or a neutral ask)
     -> activation phrase, ``<recall>``, the memory vector, its text, ``</recall>``;
   - ``sandwich``: an SFT prompt -> phrase, ``<recall>``, a memory, ``</recall>``, the SFT answer;
   - ``sft``:      an SFT prompt -> its answer (self-distilled + the chat sessions' replies);
   - ``answer``:   a question about the memory -> ``<recall>``, the memory, ``</recall>``, then
     the memory said back (``memory.questions.said_back``);
3. ``EnhancedTextMemoryTrainer`` trains LoRA + projector + new-token rows for a budget of
   optimizer steps, with a preserve term that holds the ``<recall>`` query where step 1 put it;
4. retrieval before and after, the recall threshold (``calibrate_threshold``) and
   ``decode_exact_match`` are measured on the model that gets published.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import random
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from memory.runs import last_complete_checkpoint, raise_if_stopped
from recall.cpu_bf16 import bf16_cpu_training
from recall.distributed import barrier, is_main, without_zero3_init, world_size, zero3_partitioned
from recall.model_loading import training_autocast, training_precision
from memory.config import parse_mix
from memory.questions import said_back
from memory.sft_data import SFTExample, chat_prompt
from memory.token_manager import (MEMORY_PAD_TOKEN, RECALL_END_TOKEN, RECALL_TOKEN, add_memory_tokens,
                                  end_of_turn_id, memory_token_ids, neutralize)
from recall.generation import NEUTRAL_CONTEXT, RecallEngine
from recall.text_embedding_train import ACTIVATION_PHRASE, format_query
from recall.text_memory_train import (EnhancedTextMemoryTrainer, MemoryDecodingArguments, ResampledDataset,
                                      Segment, assemble, build_decoder_model)

logger = logging.getLogger(__name__)
COMPLETE_MARKER = "metrics.json"


def normalize_ws(text: str) -> str:
    return " ".join(text.split())


@dataclasses.dataclass
class DecodingResult:
    lm: object  # the merged plain causal LM
    projector: torch.nn.Module
    query_projector: Optional[torch.nn.Module]
    metrics: dict


def _step1_model(base_lm, tokenizer, recall_dir: Path, scope: str):
    """Step 1's trained query model on a copy of ``base_lm``, rebuilt from ``recall_dir``,
    with its config and saved state."""
    from safetensors.torch import load_file

    from recall.text_embedding_train import RecallTrainingArguments, TRAINABLE_STATE, build_recall_model

    cfg = json.loads((recall_dir / "recall_config.json").read_text())
    if cfg.get("adapter_scope", "all") != scope:
        raise ValueError(f"{recall_dir}: step 1 trained adapter_scope {cfg.get('adapter_scope', 'all')!r}, "
                         f"not {scope!r} (an activated adapter cannot be merged into every position)")
    state = load_file(str(recall_dir / TRAINABLE_STATE))
    memory_dim = next((v.shape[0] for k, v in state.items() if k.endswith("projector.weight")),
                      base_lm.config.hidden_size)
    args = RecallTrainingArguments(output_dir=str(recall_dir), lora_r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"],
                                   lora_target_modules=cfg["lora_target_modules"], max_length=cfg["max_length"],
                                   query_projector=cfg["query_projector"], adapter_scope=scope,
                                   abstention=False)  # the "no memory" level is a training target only
    model = build_recall_model(copy.deepcopy(base_lm), tokenizer, args, memory_dim, list(cfg["token_ids"].values()))
    model.load_trainable_state(state)
    return model, cfg, state


def merge_recall_state(base_lm, tokenizer, recall_dir: Path):
    """A copy of ``base_lm`` with the step-1 LoRA and token rows merged in; also returns
    step 1's query projector (None when keys have the model's width) and temperature."""
    from recall.token_rows import uninstall_token_rows

    model, _, _ = _step1_model(base_lm, tokenizer, recall_dir, "all")
    lm = model.lm.merge_and_unload()
    uninstall_token_rows(lm, merge=True)
    temperature = float(torch.exp(-model.log_scale.detach()))
    return lm.eval(), model.projector, temperature


def activated_recall_state(base_lm, tokenizer, recall_dir: Path):
    """For a step-1 adapter with ``adapter_scope`` "recall": a copy of ``base_lm`` with step
    1's token rows merged in but not its LoRA (step 2 continues it as an activated adapter),
    the LoRA weights, step 1's config, its query projector and its temperature."""
    from recall.token_rows import uninstall_token_rows

    model, cfg, state = _step1_model(base_lm, tokenizer, recall_dir, "recall")
    uninstall_token_rows(model.lm.get_base_model(), merge=True)
    lm = model.lm.unload()  # the LoRA layers out, their weights not merged
    lora = {k: v for k, v in state.items() if ".lora_" in k}
    temperature = float(torch.exp(-model.log_scale.detach()))
    return lm.eval(), lora, cfg, model.projector, temperature


def _continue_activated(loaded, recall_dir: Path, args, start_lm):
    """Step 2's start for an activated step 1: the model with step 1's rows, step 1's adapter
    weights to continue, its query projector and temperature, and ``args`` set to continue
    that adapter (step 1's rank, its targets added) with no pure SFT samples and no KL on them
    (a turn without ``<recall>`` never reaches an activated adapter). ``start_lm``: an
    incremental cycle's start, the current version's base checkpoint (step 1 continued that
    version's adapter, so its saved state carries it on)."""
    lm, adapter_state, step1, query_projector, temperature = activated_recall_state(
        loaded.model if start_lm is None else start_lm, loaded.tokenizer, recall_dir)
    targets = [t for t in args.lora_target_modules.split(",") if t]
    targets += [t for t in step1["lora_target_modules"].split(",") if t and t not in targets]
    n_mem, n_sand, n_sft, n_ans = parse_mix(args.mix)
    if n_sft:
        logger.info("step 3.2: activated adapter: no pure SFT samples (mix %s -> %d:%d:0:%d): they never reach it",
                    args.mix, n_mem, n_sand, n_ans)
    args = dataclasses.replace(args, adapter_scope="recall", lora_r=step1["lora_r"], lora_alpha=step1["lora_alpha"],
                               lora_target_modules=",".join(targets), mix=f"{n_mem}:{n_sand}:0:{n_ans}", kd_weight=0.0)
    return lm, adapter_state, query_projector, temperature, args


class SampleBuilder:
    """Token segments for the sample kinds, tokenised once; ``epoch`` draws one epoch.

    ``answers[r]``: memory ``r`` said back to the user ("You live in Porto now."), or None; an
    ``answer`` sample is a ``memory`` sample after a question (``question_contexts[r]``: indices
    into ``contexts[r]``) that goes on to answer with it, so the model learns to *use* what it
    recalled. (A sandwich teaches the other half: after a memory that does not fit the prompt,
    answer the prompt.)"""

    def __init__(self, tokenizer, memories: Sequence[str], contexts: Sequence[Sequence[str]],
                 sft: Sequence[SFTExample], max_length: int, max_answer_tokens: int = 40,
                 mix: str = "2:1:2", answers: Optional[Sequence[Optional[str]]] = None,
                 question_contexts: Optional[Sequence[Sequence[int]]] = None,
                 extra_memory_samples: Optional[Sequence[int]] = None):
        if not sft:
            raise ValueError("step 2 needs SFT examples (none were found or generated)")
        tok = tokenizer
        ids = memory_token_ids(tok)
        self.recall, self.end, self.pad = ids[RECALL_TOKEN], ids[RECALL_END_TOKEN], ids[MEMORY_PAD_TOKEN]
        self.im_end = [end_of_turn_id(tok)]  # what ends an answer: the template's end-of-turn token, or EOS
        enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.max_length = max_length
        self.mix = parse_mix(mix)
        self.memories = [enc(neutralize(m, tok)) for m in memories]
        answers = answers if answers is not None else [None] * len(memories)
        question_contexts = question_contexts if question_contexts is not None else [[] for _ in memories]
        if len(answers) != len(memories) or len(question_contexts) != len(memories):
            raise ValueError(f"{len(memories)} memories, {len(answers)} answers, {len(question_contexts)} "
                             "question-context lists: one each per memory")
        self.extra = list(extra_memory_samples) if extra_memory_samples is not None else [0] * len(memories)
        if len(self.extra) != len(memories):
            raise ValueError(f"{len(memories)} memories, {len(self.extra)} extra-sample counts: one per memory")
        self.answers = [enc(" " + neutralize(a, tok)) + self.im_end if a else None for a in answers]
        self.question_contexts = [list(q) if a else [] for q, a in zip(question_contexts, answers)]
        # a context's prefix = format_query minus its trailing <recall>: the exact ids step 1 saw
        self.contexts = [[enc(format_query(tok, c))[:-1] for c in ctxs] for ctxs in contexts]
        self.sft_prompts = [enc(chat_prompt(tok, e.prompt)) for e in sft]
        self.sft_answers = [enc(neutralize(e.answer, tok))[:max_answer_tokens] + self.im_end for e in sft]
        self.phrase = enc(f"{ACTIVATION_PHRASE} ")
        self.space = enc(" ")

        # anchors: one per context, then one per SFT prompt (the sandwich's context)
        self.context_anchor = []
        n = 0
        for ctxs in self.contexts:
            self.context_anchor.append(list(range(n, n + len(ctxs))))
            n += len(ctxs)
        self.sft_anchor = list(range(n, n + len(self.sft_prompts)))

    def anchor_contexts(self) -> List[List[int]]:
        """The token ids before ``<recall>`` of every anchor, in anchor order: each memory's
        contexts, then each SFT prompt as a sandwich sample lays it out (prompt, activation
        phrase)."""
        return [c for ctxs in self.contexts for c in ctxs] + [p + self.phrase for p in self.sft_prompts]

    def memory_sample(self, row: int, context: int) -> dict:
        return assemble([Segment(self.contexts[row][context], False), Segment([self.recall], True),
                         Segment([self.pad], False), Segment(self.memories[row] + [self.end], True)],
                        self.max_length, memory_row=row, recall_target=row, kind="memory",
                        anchor=self.context_anchor[row][context])

    def answer_sample(self, row: int, context: int) -> dict:
        return assemble([Segment(self.contexts[row][context], False), Segment([self.recall], True),
                         Segment([self.pad], False), Segment(self.memories[row] + [self.end] + self.answers[row], True)],
                        self.max_length, memory_row=row, recall_target=row, kind="answer",
                        anchor=self.context_anchor[row][context])

    def sandwich_sample(self, row: int, sft: int) -> dict:
        return assemble([Segment(self.sft_prompts[sft] + self.phrase, False), Segment([self.recall], True),
                         Segment([self.pad], False),
                         Segment(self.memories[row] + [self.end] + self.space + self.sft_answers[sft], True)],
                        self.max_length, memory_row=row, kind="sandwich", anchor=self.sft_anchor[sft])

    def sft_sample(self, sft: int) -> dict:
        fits = len(self.sft_prompts[sft]) + len(self.sft_answers[sft]) <= self.max_length
        return assemble([Segment(self.sft_prompts[sft], False), Segment(self.sft_answers[sft], True)],
                        self.max_length, kind="sft", kd=sft if fits else -1)

    @torch.no_grad()
    def teacher_topk(self, model, k: int = 32, device=None, batch_size: int = 16) -> List[tuple]:
        """Per SFT example: the model's top-k (indices, log-probs) at each answer position
        (right-padded batches: causal attention makes the padding invisible)."""
        out = []
        pad = 0
        for start in range(0, len(self.sft_prompts), batch_size):
            seqs = [p + a for p, a in zip(self.sft_prompts[start:start + batch_size],
                                          self.sft_answers[start:start + batch_size])]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            for b, (p, a) in enumerate(zip(self.sft_prompts[start:start + batch_size],
                                           self.sft_answers[start:start + batch_size])):
                top = torch.log_softmax(logits[b, len(p) - 1:len(p) + len(a) - 1].float(), dim=-1).topk(k, dim=-1)
                out.append((top.indices.cpu(), top.values.cpu()))
        return out


    def epoch(self, epoch: int, rng: random.Random) -> List[dict]:
        """One epoch's samples, shuffled: per memory ``mix`` = (memory, sandwich, sft, answer)
        counts, plus the memory's ``extra_memory_samples``. A memory with no answer or no question
        context gets memory samples instead of its answer samples."""
        n_mem, n_sand, n_sft, n_ans = self.mix
        rows = range(len(self.memories))
        items = []
        for r in rows:  # distinct contexts while they last
            questions = self.question_contexts[r]
            n_answer = n_ans if questions else 0
            n_memory = n_mem + n_ans - n_answer + self.extra[r]
            picks = rng.sample(range(len(self.contexts[r])), min(n_memory, len(self.contexts[r])))
            picks += [rng.randrange(len(self.contexts[r])) for _ in range(n_memory - len(picks))]
            items += [self.memory_sample(r, c) for c in picks]
            if n_answer:
                asks = rng.sample(questions, min(n_answer, len(questions)))
                asks += [rng.choice(questions) for _ in range(n_answer - len(asks))]
                items += [self.answer_sample(r, c) for c in asks]
        items += [self.sandwich_sample(r, rng.randrange(len(self.sft_prompts))) for r in rows for _ in range(n_sand)]
        n = len(self.memories) * n_sft
        picks = rng.sample(range(len(self.sft_prompts)), n) if n <= len(self.sft_prompts) \
            else [rng.randrange(len(self.sft_prompts)) for _ in range(n)]
        items += [self.sft_sample(i) for i in picks]
        rng.shuffle(items)
        return items


def crowded_memories(bank: np.ndarray, cosine: float, chunk: int = 1024) -> np.ndarray:
    """Whether each memory vector has another within ``cosine``, after centring on the bank's
    mean as the projector injects them (raw last-token states all share one direction). Chunked:
    a bank of 100,000 memories never builds its full similarity matrix."""
    v = np.asarray(bank, dtype=np.float32)
    if len(v) < 2:
        return np.zeros(len(v), dtype=bool)
    v = v - v.mean(axis=0)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    out = np.zeros(len(v), dtype=bool)
    for start in range(0, len(v), chunk):
        sims = v[start:start + chunk] @ v.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
        out[start:start + chunk] = sims.max(axis=1) >= cosine
    return out


def _context_cues(cues: Sequence) -> list:
    """The cues that are step-2 contexts (see ``decode_contexts``), in order."""
    return [c for c in cues if c.kind in ("question", "source")
            or (c.kind == "template" and _WH_QUESTION.match(c.text))]


def question_contexts(cues: Sequence) -> List[int]:
    """Indices into ``decode_contexts(cues)`` of the contexts that ask about the memory: the
    questions and the neutral ask, not the source turns (what the user said is no question to
    answer with the fact)."""
    kinds = [c.kind for c in _context_cues(cues)] + ["neutral"]
    return [i for i, k in enumerate(kinds) if k != "source"]


def decode_contexts(cues: Sequence) -> List[str]:
    """Contexts for ``memory`` samples: questions and source turns, and the neutral ask used
    by ``decode_exact_match``. The memory's own text is left out: with it in the context the
    model could copy instead of reading the vector. Rule-made yes/no questions are left out for
    the same reason: "Do I live in Porto now?" holds the whole fact (with all rule-made questions
    in, 0.08 of the memories decoded after 4 epochs, against 0.90 without). Rule-made
    wh-questions stay: the chunk they ask about is gone from them ("Where do I live now?"), so
    the answer must come from the vector, after a question, as in the recall loop."""
    return [c.text for c in _context_cues(cues)] + [NEUTRAL_CONTEXT]


_WH_QUESTION = re.compile(r"^(?:what|where|when|who|whom|whose|which|how|why)\b", re.I)


def exact_match_rate(decoded: Sequence[str], texts: Sequence[str]) -> float:
    return sum(normalize_ws(d) == normalize_ws(t) for d, t in zip(decoded, texts)) / max(len(texts), 1)


@contextlib.contextmanager
def _timed(phases: Dict[str, float], name: str):
    """Adds the block's wall seconds to ``phases[name]`` (step 2's ``phase_seconds``)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - start


def retrieval_at_1(engine: RecallEngine, contexts: Sequence[str], targets: Sequence[int], bank: np.ndarray,
                   queries: Optional[np.ndarray] = None) -> dict:
    """recall@1 and MRR of ``contexts`` against ``bank``; ``queries``: their query vectors when
    already computed."""
    q = engine.query_vectors(list(contexts)) if queries is None else queries
    scores = q @ bank.T
    target_scores = scores[np.arange(len(targets)), targets]
    ranks = (scores > target_scores[:, None]).sum(1) + 1
    return {"recall_at_1": float((ranks == 1).mean()), "mrr": float((1.0 / ranks).mean()), "n": len(targets)}


def _sample_builder(tok, texts, records, bank: np.ndarray, cues: Dict[int, list], sft: Sequence[SFTExample],
                    args) -> SampleBuilder:
    """Step 2's samples for ``records``: each memory's text (``texts``, as training targets it),
    contexts, answer said back, and the extra memory samples of a crowded memory
    (``crowded_memories``)."""
    return SampleBuilder(tok, texts, [decode_contexts(cues[r.id]) for r in records],
                         sft, args.max_length, mix=args.mix, answers=[said_back(r.text) for r in records],
                         question_contexts=[question_contexts(cues[r.id]) for r in records],
                         extra_memory_samples=args.neighbour_samples * crowded_memories(bank, args.neighbour_cosine))


def train_memory_decoding(loaded, records, bank: np.ndarray, cues: Dict[int, list], sft: Sequence[SFTExample],
                          recall_dir: Path, args: MemoryDecodingArguments, out_dir: Path,
                          reference_vectors: Optional[np.ndarray] = None, *, start_lm=None,
                          start_projector: Optional[torch.nn.Module] = None,
                          callbacks: Sequence = ()) -> DecodingResult:
    """Train step 2 and return the merged model, projector and metrics.

    ``start_lm``/``start_projector``: an incremental cycle continues the current version's
    model and projector (the projector keeps its centre, so old memories keep their
    embeddings); by default step 2 starts from the base model (``loaded.model``), which also
    stays the KD teacher either way, so drift does not accumulate across cycles."""
    started = time.perf_counter()
    tok = loaded.tokenizer
    token_ids = add_memory_tokens(loaded.model, tok)  # idempotent; the ids step 1 used
    scope, lm, adapter_state, query_projector, temperature, args = _start_from_step1(loaded, recall_dir, args, start_lm)
    texts = [neutralize(r.text, tok) for r in records]  # what training targets and decoding yields
    eval_ctx = [(c.text, row) for row, r in enumerate(records) for c in cues[r.id]]
    metrics: Dict[str, object] = {"memories": len(records), "sft_examples": len(sft), "adapter_scope": scope}

    # the <recall> state itself (what the preserve term keeps), and step 1's query from it: the
    # same unless memory vectors have another width (e.g. MiniLM's), where a fixed projector maps it
    from transformers.integrations import is_deepspeed_zero3_enabled

    # ZeRO-3 partitions the model in place when training starts: keep a full copy to rebuild from
    spare = copy.deepcopy(lm) if is_deepspeed_zero3_enabled() else None
    model = None
    query_lm = lm
    if scope == "recall":  # the step-1 function lives in the adapter: wrap first, query through it
        model = build_decoder_model(lm, token_ids, dataclasses.replace(args, recall_temperature=temperature),
                                    bank.shape[1], memory_bank=torch.from_numpy(bank) if query_projector is None
                                    else None, adapter_state=adapter_state)
        query_lm = model.lm
    before = RecallEngine(query_lm, tok, token_ids, query_projector=query_projector,
                          autocast_dtype=loaded.runtime.autocast_dtype)
    phases = metrics["phase_seconds"] = {"setup": time.perf_counter() - started}
    builder = _sample_builder(tok, texts, records, bank, cues, sft, args)
    metrics["crowded_memories"] = int(sum(e > 0 for e in builder.extra))
    with _timed(phases, "queries"):  # the served queries before step 2, in the runtime's precision
        metrics["recall_before"] = retrieval_at_1(before, [c for c, _ in eval_ctx], [t for _, t in eval_ctx], bank)
    kd = None
    with _timed(phases, "kd_teacher"):
        if args.kd_weight > 0:  # the original base model (before step 1) is the teacher on SFT answers
            kd = builder.teacher_topk(loaded.model, device=loaded.runtime.device)
    mark = time.perf_counter()
    dataset = ResampledDataset(builder.epoch, seed=args.seed,
                               group=args.per_device_train_batch_size if args.length_grouped else 0)
    metrics["epochs"] = args.num_train_epochs = epochs_for_min_steps(len(dataset), args)
    bank_t = torch.from_numpy(bank)
    if model is None:
        model = build_decoder_model(lm, token_ids, dataclasses.replace(args, recall_temperature=temperature),
                                    bank.shape[1], memory_bank=bank_t if query_projector is None else None)
    _init_projector(model, start_projector, bank, reference_vectors)
    model.to(loaded.runtime.device)
    with _timed(phases, "anchors"):
        anchors = _anchors(model, builder, args, loaded.runtime.device)
    # each memory after the neutral ask (the last context of every memory): what decode_exact_match decodes
    checks = [builder.memory_sample(row, len(ctxs) - 1) for row, ctxs in enumerate(builder.contexts)]
    trainer = EnhancedTextMemoryTrainer(model=model, args=args, memory_vectors=bank_t, tokenizer=tok,
                                        train_dataset=dataset, anchors=anchors, kd=kd, check_samples=checks,
                                        callbacks=list(callbacks))
    phases["build"] = time.perf_counter() - mark - phases.get("anchors", 0.0)
    metrics["train"] = _fit(trainer, model, dataset, args, out_dir, loaded.model.dtype)
    barrier()
    if not is_main():  # rank 0 measures and publishes
        return DecodingResult(None, None, query_projector, metrics)
    with without_zero3_init():  # rank 0 alone from here: generate must not wait for the other ranks
        return _measure(loaded, model, spare, token_ids, args, temperature, bank, bank_t, query_projector, out_dir,
                        texts, eval_ctx, metrics, started, adapter_state)


def _start_from_step1(loaded, recall_dir: Path, args: MemoryDecodingArguments, start_lm):
    """``(scope, lm, adapter_state, query_projector, temperature, args)``: step 1's result to
    continue, with its activated adapter (scope "recall") or merged into the model ("all")."""
    scope = json.loads((recall_dir / "recall_config.json").read_text()).get("adapter_scope", "all")
    if scope == "recall":  # continue step 1's activated adapter (recall.activation)
        lm, adapter_state, query_projector, temperature, args = _continue_activated(loaded, recall_dir, args, start_lm)
        return scope, lm, adapter_state, query_projector, temperature, args
    lm, query_projector, temperature = merge_recall_state(loaded.model if start_lm is None else start_lm,
                                                          loaded.tokenizer, recall_dir)
    return scope, lm, None, query_projector, temperature, args


def _init_projector(model, start_projector, bank: np.ndarray, reference_vectors: Optional[np.ndarray]) -> None:
    """The memory projector: the current version's (an incremental cycle), or centred on the bank."""
    if start_projector is not None:
        try:
            model.projector.load_state_dict(start_projector.state_dict())
        except RuntimeError as exc:
            raise ValueError(f"the current version's memory projector does not fit this configuration "
                             f"(decode_projector_hidden changed?); retrain with --full: {exc}") from None
    else:
        refs = bank if reference_vectors is None else np.concatenate([bank, reference_vectors])
        model.projector.fit_center(torch.from_numpy(refs))


def _anchors(model, builder, args: MemoryDecodingArguments, device):
    """The <recall> state of every context a sample can have, as step 1 left it (the preserve term)."""
    if args.preserve_weight <= 0:
        return None
    with training_autocast(args, device), bf16_cpu_training(model, args, device):  # the forward training runs
        return model.recall_states(builder.anchor_contexts())


def _fit(trainer, model, dataset, args: MemoryDecodingArguments, out_dir: Path, dtype) -> dict:
    """Train (resuming from the newest complete checkpoint), save, and return the training figures."""
    train_started = time.perf_counter()
    resume = args.resume_from_checkpoint or last_complete_checkpoint(out_dir)
    if resume:
        logger.info("step 3.2: resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    raise_if_stopped(trainer.state, "step 3.2")
    train_seconds = time.perf_counter() - train_started
    trainer.save_model(str(out_dir))  # collective under DeepSpeed; only rank 0 writes
    epochs_run = trainer.state.epoch or 0.0
    tokens = sum(len(x["input_ids"]) for x in dataset.items) * epochs_run
    train = {"loss": result.training_loss, "seconds": train_seconds, "samples_per_epoch": len(dataset),
             "epochs_run": epochs_run, "tokens_per_second": tokens / max(train_seconds, 1e-9),
             "world_size": world_size(), "precision": training_precision(args, dtype),
             # the teacher-forced check at each epoch's end (see EnhancedTextMemoryTrainer.decode_check)
             "exact_match_by_epoch": [{"epoch": round(h["epoch"], 2), "exact_match": h["decode_exact_match"]}
                                      for h in trainer.state.log_history if "decode_exact_match" in h]}
    cache = getattr(model, "context_cache", None)
    if cache is not None:  # the activated adapter's contexts, each run once (MemoryDecodingArguments.context_cache_mb)
        train["context_cache"] = {"hits": cache.hits, "misses": cache.misses, "entries": len(cache.entries),
                                  "mb": round(cache.bytes / 2 ** 20, 1)}
    return train


def _schedule(samples_per_epoch: int, args):
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size()
    steps_per_epoch = max(1, math.ceil(samples_per_epoch / per_step))
    return max(args.num_train_epochs, math.ceil(args.min_steps / steps_per_epoch)), steps_per_epoch


def planned_steps(memories: int, args, activated: bool) -> int:
    """Step 2's optimizer steps for ``memories`` memories under ``args`` (its ``mix`` per memory;
    no pure SFT samples for an activated adapter): what a cycle's plan weighs."""
    n_mem, n_sand, n_sft, n_ans = parse_mix(args.mix)
    epochs, steps_per_epoch = _schedule(memories * (n_mem + n_sand + n_ans + (0 if activated else n_sft)), args)
    return math.ceil(epochs * steps_per_epoch)


def epochs_for_min_steps(samples_per_epoch: int, args) -> float:
    """Epochs that give at least ``args.min_steps`` optimizer steps (a cycle of a few memories
    otherwise gets a few dozen steps, too few to learn decoding); never fewer than configured."""
    epochs, _ = _schedule(samples_per_epoch, args)
    if epochs > args.num_train_epochs:
        logger.info("step 3.2: %d samples per epoch; %d epochs instead of %g to reach min_steps %d",
                    samples_per_epoch, epochs, args.num_train_epochs, args.min_steps)
    return epochs


def rejecting_level(scores: np.ndarray, rate: float) -> float:
    """The lowest level that at most ``floor(rate * n)`` of the ``n`` scores reach (``>=``): just
    above the next-highest score. A quantile rounds the other way on small samples (numpy's
    "lower" 97.5% quantile of 67 scores lets 3 through, 4.5%)."""
    # the next value up in the scores' own precision: a float64 step above a float32 score rounds
    # back onto it when the threshold meets float32 scores again (numpy casts a Python float to
    # the array's dtype), and that score would pass
    values = np.asarray(scores)
    values = values.astype(np.float64) if not np.issubdtype(values.dtype, np.floating) else values
    top = np.sort(values)[::-1]
    allowed = int(np.floor(rate * len(top) + 1e-9))
    if allowed >= len(top):
        return float(top[-1])
    return float(np.nextafter(top[allowed], np.array(np.inf, dtype=top.dtype)))


def calibrate_threshold(engine: RecallEngine, contexts: Sequence[str], targets: Sequence[int],
                        unrelated: Sequence[str], bank: np.ndarray, false_positive_rate: float = 0.01,
                        miss_rate: float = 0.05, context_queries: Optional[np.ndarray] = None) -> dict:
    """The recall threshold for ``recall_threshold auto``, from two score samples: the best
    memory cosine of each ``unrelated`` prompt (general questions no memory answers) and that
    of each training ``context`` whose best memory is the right one.

    The threshold is the lower of two bounds, so a real memory is not blocked for the sake of
    rejecting unrelated prompts: the cosine only ``false_positive_rate`` of the unrelated
    prompts reach, and the one all but ``miss_rate`` of the correct contexts reach. The report
    says which bound decided and how often each sample passes. Cosines depend on the encoder
    (chat-model vectors and MiniLM's sit at very different levels), which is why a fixed
    default fits neither. No evaluation question is used. The unrelated sample is
    ``memory.sft_data.calibration_prompts`` (462 prompts, a quarter in the first person), and its
    bound lets at most ``floor(false_positive_rate * n)`` of them through (``rejecting_level``).
    On the development set (``python -m bench.threshold``, ``examples/dev/general_prompts.json``:
    96 requests and 50 small-talk messages), 0.01 let 0.021 of those through and 0.694 of the
    questions still got their right memory; 0.025 let 0.082 through (0.714), and 0.05 0.158
    (0.735): a greeting or a thanks reached a memory a quarter of the time at 0.05."""
    unit = bank / np.linalg.norm(bank, axis=1, keepdims=True).clip(1e-12)
    neg = (engine.query_vectors(list(unrelated)) @ unit.T).max(1)
    scores = (engine.query_vectors(list(contexts)) if context_queries is None else context_queries) @ unit.T
    pos = scores.max(1)[scores.argmax(1) == np.asarray(targets)]
    reject = rejecting_level(neg, false_positive_rate)
    # an observed score ("lower"), so at least 1 - miss_rate of the correct contexts pass, also when few
    keep = float(np.quantile(pos, miss_rate, method="lower")) if len(pos) else reject
    value = min(reject, keep)
    return {"value": value,
            "decided_by": "correct contexts" if keep < reject else "unrelated prompts",
            "rule": f"min(the lowest level at most {false_positive_rate * 100:g}% of unrelated prompts' best score reach, "
                    f"{miss_rate * 100:g}% quantile of correct contexts' score)",
            "unrelated": len(neg), "unrelated_pass": float((neg >= value).mean()),
            "correct_contexts": len(pos), "correct_pass": float((pos >= value).mean()) if len(pos) else None,
            "unrelated_best_median": float(np.median(neg)),
            "correct_best_median": float(np.median(pos)) if len(pos) else None}


def _measure(loaded, model, spare, token_ids, args, temperature, bank, bank_t, query_projector, out_dir, texts,
             eval_ctx, metrics, started, adapter_state=None) -> DecodingResult:
    tok = loaded.tokenizer
    if zero3_partitioned(model.parameters()):  # rebuild unpartitioned from the saved trainable state
        from safetensors.torch import load_file

        from recall.text_memory_train import DECODER_STATE

        model = build_decoder_model(spare, token_ids, dataclasses.replace(args, recall_temperature=temperature),
                                    bank.shape[1], memory_bank=bank_t if query_projector is None else None,
                                    adapter_state=adapter_state)
        model.load_trainable_state(load_file(str(out_dir / DECODER_STATE)))
        model.to(loaded.runtime.device)
    model.eval()
    phases = metrics.setdefault("phase_seconds", {})
    projector = model.projector
    with _timed(phases, "merge"):
        merged = model.merged_lm().eval()
    engine = RecallEngine(merged, tok, token_ids, projector, query_projector, autocast_dtype=loaded.runtime.autocast_dtype)
    contexts, targets = [c for c, _ in eval_ctx], [t for _, t in eval_ctx]
    with _timed(phases, "recall_after"):
        queries = engine.query_vectors(contexts)  # once, for both figures
        metrics["recall_after"] = retrieval_at_1(engine, contexts, targets, bank, queries)
    from memory.sft_data import calibration_prompts

    with _timed(phases, "threshold"):
        metrics["threshold"] = calibrate_threshold(engine, contexts, targets, calibration_prompts(), bank,
                                                   context_queries=queries)
    with _timed(phases, "decode_check"):
        decoded = engine.decode_memories(bank)
    metrics["decode_exact_match"] = exact_match_rate(decoded, texts)
    metrics["decode_failures"] = [{"text": t, "decoded": d} for t, d in zip(texts, decoded)
                                  if normalize_ws(d) != normalize_ws(t)][:20]
    metrics["seconds"] = time.perf_counter() - started
    logger.info("step 3.2: decode_exact_match %.3f, <recall> recall@1 on cues %.3f -> %.3f; calibrated threshold "
                "%.3f (passes %.2f of correct cues, %.2f of unrelated prompts)", metrics["decode_exact_match"],
                metrics["recall_before"]["recall_at_1"], metrics["recall_after"]["recall_at_1"],
                metrics["threshold"]["value"], metrics["threshold"]["correct_pass"] or 0.0,
                metrics["threshold"]["unrelated_pass"])
    return DecodingResult(merged, projector, query_projector, metrics)
