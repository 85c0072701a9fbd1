"""Step 3.1 orchestration: memories + cues from the DB -> ``RecallMemoryTrainer`` runs.

1. live memories (pending + active) and their vectors form the memory bank;
2. cues are generated once per memory and stored (``memory.cues``);
3. optional K-fold cross-validation and an unseen-memory measurement, each training a
   fresh adapter from the base model;
4. the final adapter is trained on every cue and saved under ``RUN_DIR/recall/``:
   ``recall_state.safetensors`` (LoRA + fp32 token rows + temperature), ``recall_config.json``
   and, written last, ``metrics.json`` (its presence marks the directory complete).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from memory.cues import ensure_cues, memory_cues
from memory.fileio import atomic_write_json
from memory.runs import last_complete_checkpoint, raise_if_stopped
from memory.sft_data import abstention_prompts
from recall.distributed import barrier, is_main, without_zero3_init, world_size, zero3_partitioned
from recall.lora_targets import resolve_targets
from recall.model_loading import training_precision
from memory.token_manager import RECALL_TOKEN, add_memory_tokens
from recall.kfold import ALWAYS_TRAIN_KINDS, cross_validate, cue_key, holdout_memories, with_positives
from recall.text_embedding_train import (ACTIVATION_PHRASE, RecallMemoryTrainer, RecallTrainingArguments,
                                         build_recall_model, format_query)

logger = logging.getLogger(__name__)
COMPLETE_MARKER = "metrics.json"


def with_abstention(data: List[dict], tokenizer, n_rows: int, per_cue: float) -> List[dict]:
    """``data`` plus general prompts that no memory answers, targeting the "no memory" class
    (row ``n_rows``): at most ``per_cue`` per labelled cue (``--abstention_per_cue``), so a small
    bank is not swamped. A prompt that is also an unlabelled text (``--recall_general_prompts``)
    is kept as "no memory" only: the two would pull it two ways."""
    n_cues = sum(0 <= d["target"] < n_rows for d in data)
    prompts = abstention_prompts()[:int(n_cues * per_cue)]
    taken = set(prompts)
    return [d for d in data if d["target"] >= 0 or d["raw"] not in taken] + [
        {"text": format_query(tokenizer, t), "raw": t, "target": n_rows, "kind": "abstain", "memory_id": None}
        for t in prompts]


def build_dataset(tokenizer, records, cues: Dict[int, list], extra_texts: Sequence[str] = ()) -> List[dict]:
    """Labelled cues (target = the memory's row in the bank) plus unlabelled ``extra_texts``
    (target -1: they only carry a teacher distribution). Records without an entry in
    ``cues`` are in the bank (as negatives) but have no cue of their own."""
    data = [{"text": format_query(tokenizer, cue.text), "raw": cue.text, "target": row, "kind": cue.kind,
             "memory_id": rec.id, "user": rec.user_id} for row, rec in enumerate(records) for cue in cues.get(rec.id, ())]
    data += [{"text": format_query(tokenizer, t), "raw": t, "target": -1, "kind": "context", "memory_id": None}
             for t in extra_texts]
    return data


class Teacher:
    """A sentence encoder's view of the bank: which memory does a text point to?

    Used twice: to drop generated questions that do not point to their own memory
    (rank > ``max_rank`` among the user's memories), and as soft targets over the bank
    for the KL term, so ``<recall>`` learns the encoder's semantic ranking on any text,
    including unlabelled chat turns."""

    def __init__(self, encoder: str, records, temperature: float):
        from memory.vectors import SentenceEncoderVectorizer

        self.encoder = SentenceEncoderVectorizer(encoder)
        self.keys = self.encoder.encode([r.text for r in records])
        self.users = [r.user_id for r in records]
        self.temperature = temperature

    def vectors(self, texts: Sequence[str]):
        return torch.from_numpy(self.encoder.encode(list(texts))).float()

    def probabilities(self, vectors: torch.Tensor):
        """Soft targets over the bank for text vectors from ``self.vectors``."""
        scores = vectors @ torch.from_numpy(self.keys).float().T
        return torch.softmax(scores / self.temperature, dim=-1)

    def keeps(self, text: str, row: int, max_rank: int) -> bool:
        scores = self.encoder.encode([text])[0] @ self.keys.T
        same_user = [i for i, u in enumerate(self.users) if u == self.users[row]]
        return sum(scores[i] > scores[row] for i in same_user) < max_rank


def _filter_questions(cues, records, teacher: Teacher, max_rank: int) -> int:
    dropped = 0
    for row, rec in enumerate(records):
        if rec.id not in cues:
            continue
        kept = [c for c in cues[rec.id] if c.kind != "question" or teacher.keeps(c.text, row, max_rank)]
        dropped += len(cues[rec.id]) - len(kept)
        cues[rec.id] = kept
    return dropped


class _Fitter:
    """Trains an adapter on ``start_lm`` (the base model, or the current version in an
    incremental cycle) for a given cue subset: a fresh one, or ``start_adapter`` continued (an
    activated version's)."""

    def __init__(self, start_lm, tokenizer, token_ids, bank, train_args: RecallTrainingArguments,
                 callbacks: Sequence = (), query_projector=None, start_adapter=None, bank_users=None):
        self.base, self.tokenizer, self.start_adapter = start_lm, tokenizer, start_adapter
        self.bank_users = bank_users
        self.token_ids, self.bank, self.train_args = token_ids, bank, train_args
        self.callbacks, self.query_projector = list(callbacks), query_projector

    def __call__(self, train: List[dict], held_out: Optional[List[dict]], out_dir: Path, save: bool = False):
        args = dataclasses.replace(self.train_args, output_dir=str(out_dir),
                                   save_strategy=self.train_args.save_strategy if save else "no")
        model = build_recall_model(copy.deepcopy(self.base), self.tokenizer, args, self.bank.shape[1],
                                   list(self.token_ids.values()), adapter_state=self.start_adapter)
        if self.query_projector is not None and model.projector is not None:  # continue the current version's
            model.projector.load_state_dict(self.query_projector.state_dict())
        trainer = RecallMemoryTrainer(model=model, args=args, memory_bank=self.bank, tokenizer=self.tokenizer,
                                      recall_token_id=self.token_ids[RECALL_TOKEN], train_dataset=train,
                                      callbacks=self.callbacks, bank_users=self.bank_users)
        resume = (self.train_args.resume_from_checkpoint or last_complete_checkpoint(out_dir)) if save else None
        if resume:
            logger.info("step 3.1: resuming from %s", resume)
        trainer.train(resume_from_checkpoint=resume)
        raise_if_stopped(trainer.state, "step 3.1")
        metrics = trainer.evaluate(held_out) if held_out else {}
        metrics = {k.removeprefix("eval_"): v for k, v in metrics.items()}
        if held_out and not save:  # a K-fold or unseen-memory measurement: which cues it missed
            metrics["misses"] = trainer.eval_misses
        return trainer, metrics


def _name_misses(misses: Sequence[dict], records) -> None:
    """Missed held-out cues with memory texts in place of bank rows (for the metrics file)."""
    for miss in misses:
        miss["expected"] = [records[r].text for r in miss.pop("positives")]
        miss["top"] = records[miss["top"]].text if miss["top"] < len(records) else "(no memory)"


def train_recall_token(loaded, db, store, args, train_args: RecallTrainingArguments,
                       run_dir: Path, extra_texts: Sequence[str] = (), *, bank_ids: Optional[Sequence[int]] = None,
                       train_ids: Optional[Sequence[int]] = None, start_lm=None, query_projector=None,
                       start_adapter: Optional[dict] = None, callbacks: Sequence = ()) -> Optional[dict]:
    """Run step 3.1; returns the metrics written to ``run_dir/recall/metrics.json``.

    ``bank_ids``: the memories whose vectors form the bank (default: every live memory);
    ``train_ids``: those whose cues are trained (default: the whole bank). An incremental
    cycle trains new + replayed memories against the whole bank, starting from
    ``start_lm`` (the current version's model) instead of the base model; for an activated
    version, ``start_lm`` is its base checkpoint and ``start_adapter`` the LoRA it continues."""
    records = db.records(statuses=("pending", "active")) if bank_ids is None else [db.get(i) for i in bank_ids]
    if not records:
        logger.warning("step 3.1: no memories in the store, skipping <recall> training")
        return None
    started = time.perf_counter()
    teacher = None
    if args.recall_teacher != "none":
        teacher = Teacher(args.recall_teacher, records, args.recall_teacher_temperature)
    if train_args.vector_distill_weight > 0 and (teacher is None or teacher.encoder.encoder_id != db.encoder_id):
        raise ValueError(f"vector_distill_weight: the <recall> query can only learn the teacher's vectors when "
                         f"the memory vectors come from the same encoder (memory DB: {db.encoder_id}, teacher: "
                         f"{'none' if teacher is None else teacher.encoder.encoder_id}); set --embedding_model "
                         f"to the --recall_teacher encoder, or vector_distill_weight to 0")
    token_ids = add_memory_tokens(loaded.model, loaded.tokenizer)
    wanted = set(r.id for r in records) if train_ids is None else set(train_ids)
    trained = [r for r in records if r.id in wanted]
    if is_main():  # rank 0 generates and stores missing cues; the other ranks read them
        with without_zero3_init():  # alone: HF generate must not wait for the other ranks (synced_gpus)
            from memory.secrets import secret_filter_for

            ensure_cues(db, trained, loaded.model, loaded.tokenizer, store, args.cue_questions, train_args.seed,
                        secret_filter=secret_filter_for(args.secret_filter))
    barrier()
    cues = memory_cues([db.get(r.id) for r in trained], templates=args.cue_templates)
    bank = torch.from_numpy(db.vectors([r.id for r in records]))
    metrics: Dict[str, object] = {"memories": len(trained), "bank": len(records)}
    data = _training_data(loaded.tokenizer, records, cues, extra_texts, teacher, train_args, args, metrics)
    train_args = _with_targets(train_args, loaded.model if start_lm is None else start_lm, start_adapter)
    fit = _Fitter(loaded.model if start_lm is None else start_lm, loaded.tokenizer, token_ids, bank, train_args,
                  callbacks, query_projector, start_adapter, bank_users=[r.user_id for r in records])
    _held_out(fit, data, records, args, train_args.seed, run_dir, metrics)
    out = run_dir / "recall"
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    trainer, train_metrics = fit(data, data, out, save=True)
    metrics["final_train_set"] = train_metrics  # the kept adapter, measured on its own training cues
    abstain = getattr(trainer.accelerator.unwrap_model(trainer.model), "abstain", None)
    if abstain is not None and not zero3_partitioned([abstain]):
        metrics["abstain_level"] = float(abstain.detach().float().reshape(-1)[0])
    trainer.save_model(str(out))  # collective under DeepSpeed; only rank 0 writes
    metrics["seconds"] = time.perf_counter() - started
    metrics["world_size"] = world_size()
    metrics["precision"] = training_precision(train_args, loaded.model.dtype)
    if is_main():
        _write_config(out, loaded, records, trained, token_ids, train_args, db.encoder_id)
        atomic_write_json(out / COMPLETE_MARKER, metrics)
    return metrics


def _training_data(tokenizer, records, cues, extra_texts, teacher, train_args, args, metrics) -> List[dict]:
    """Step 3.1's rows: cues, unlabelled texts (only with a teacher), general prompts for "no
    memory", each with the teacher's probabilities when there is one; counts go into ``metrics``."""
    if teacher is not None:
        metrics["questions_dropped_by_teacher"] = _filter_questions(cues, records, teacher, args.cue_filter_rank)
    else:
        extra_texts = ()  # unlabelled texts only teach through a teacher
    data = build_dataset(tokenizer, records, cues, extra_texts)
    if train_args.abstention:
        data = with_abstention(data, tokenizer, len(records), train_args.abstention_per_cue)
    with_positives(data, len(records))  # a message stating two facts is a cue of both
    if teacher is not None:
        vectors = teacher.vectors([d["raw"] for d in data])  # each text encoded once, for both terms
        for item, probs, vec in zip(data, teacher.probabilities(vectors), vectors):
            probs = probs.tolist()
            if train_args.abstention:  # a class more: no mass on it, or all of it for a general prompt
                probs = [0.0] * len(probs) + [1.0] if item["kind"] == "abstain" else probs + [0.0]
            item["teacher"] = probs
            if train_args.vector_distill_weight > 0:
                item["teacher_vector"] = vec.tolist()
    metrics["cues"] = sum(0 <= d["target"] < len(records) for d in data)
    metrics["abstain_texts"] = sum(d["kind"] == "abstain" for d in data)
    metrics["unlabelled_texts"] = len(data) - metrics["cues"] - metrics["abstain_texts"]
    logger.info("step 3.1: %d memories, %d cues, %d unlabelled texts, %d general prompts for 'no memory'",
                len(records), metrics["cues"], metrics["unlabelled_texts"], metrics["abstain_texts"])
    return data


def _with_targets(train_args: RecallTrainingArguments, model, start_adapter: Optional[dict]) -> RecallTrainingArguments:
    """'auto' LoRA targets read off the model and recorded by name; continuing a version's
    adapter, every layer it has (step 2 may have added targets)."""
    train_args = dataclasses.replace(train_args, lora_target_modules=",".join(
        resolve_targets(model, train_args.lora_target_modules, train_args.adapter_scope)))
    if start_adapter:
        targets = [t for t in train_args.lora_target_modules.split(",") if t]
        targets += sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in start_adapter} - set(targets))
        train_args = dataclasses.replace(train_args, lora_target_modules=",".join(targets))
    return train_args


def _held_out(fit, data, records, args, seed: int, run_dir: Path, metrics: dict) -> None:
    """K-fold cross-validation and held-out memories (``metrics["kfold"]``, ``metrics["unseen"]``)."""
    if args.k_folds >= 2 and not any(d["kind"] not in ALWAYS_TRAIN_KINDS for d in data):
        logger.warning("step 3.1: no cue besides the memory texts; skipping %d-fold cross-validation", args.k_folds)
    elif args.k_folds >= 2:
        metrics["kfold"] = cross_validate(
            data, args.k_folds, lambda tr, ev, f: fit(tr, ev, run_dir / "kfold" / f"fold{f}")[1], seed=seed)
    if args.eval_unseen_fraction > 0:
        held = holdout_memories([d["target"] for d in data if 0 <= d["target"] < len(records)],
                                args.eval_unseen_fraction, seed)
        train = [d for d in data if d["target"] not in held]
        trained_keys = {cue_key(d["raw"]) for d in train}  # a text shared with a trained memory is not unseen
        metrics["unseen"] = fit(train, [d for d in data if d["target"] in held and cue_key(d["raw"]) not in trained_keys],
                                run_dir / "unseen")[1]
    for part in (metrics.get("kfold"), metrics.get("unseen")):
        _name_misses((part or {}).get("misses", ()), records)


def _write_config(out: Path, loaded, records, trained, token_ids, train_args, encoder_id) -> None:
    loaded.tokenizer.save_pretrained(out)
    atomic_write_json(out / "recall_config.json", {
        "base_model": loaded.source.location, "base_gguf_file": loaded.source.gguf_file,
        "base_identity": loaded.source.identity, "token_ids": token_ids, "encoder_id": encoder_id,
        "memory_ids": [r.id for r in trained], "bank_ids": [r.id for r in records], "activation_phrase": ACTIVATION_PHRASE,
        "lora_r": train_args.lora_r, "lora_alpha": train_args.lora_alpha,
        "lora_target_modules": train_args.lora_target_modules, "max_length": train_args.max_length,
        "query_projector": train_args.query_projector, "adapter_scope": train_args.adapter_scope,
    })
