"""Step 1: train the ``<recall>`` token (``RecallMemoryTrainer``).

Goal: for any context, the final hidden state at a trailing ``<recall>`` is a query
vector whose nearest memory vector is the memory that context needs.

- **Model** (``RecallQueryModel``): the causal LM with LoRA adapters, fp32 delta rows
  for the new tokens (``recall.token_rows``), an optional linear query projector (for
  memory vectors from an encoder of another width) and a learnable temperature. Only
  the backbone runs: no LM head.
- **Loss** (``MemoryBankInfoNCE``): cross-entropy of the query against the *whole*
  memory bank. The memory vectors are fixed targets, so every other memory is a
  negative, not just the batch's.
- **Trainer**: a ``transformers.Trainer`` subclass overriding the collator,
  ``compute_loss``, ``evaluate`` (retrieval metrics) and the save/load of the small
  trainable state. Optimiser, schedule, accumulation, checkpoints, resume, logging and
  DeepSpeed are inherited.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainingArguments

from memory.token_manager import RECALL_TOKEN, safe_chat_template
from recall.arg_checks import check_numbers, check_training_numbers
from recall.activation import (adapter_active, base_context_pass, check_scope, load_lora_state, lora_config,
                               use_fast_forward)
from recall.distributed import prepare_deepspeed_args
from recall.get_text_embedding import backbone, encode_by_length, last_token_positions
from recall.lora_targets import resolve_targets
from recall.token_rows import SmallStateTrainerMixin, TrainableStateMixin, install_token_rows

logger = logging.getLogger(__name__)

ACTIVATION_PHRASE = "Let me check my memory."
TRAINABLE_STATE = "recall_state.safetensors"
ABSTAIN_INIT = 0.5  # the "no memory" level's starting cosine


def format_query(tokenizer, context: str, activation: str = ACTIVATION_PHRASE) -> str:
    """The text whose last token is ``<recall>``: the context as a user turn, then the
    assistant starting its answer with the activation phrase. The recall loop builds the
    same shape at inference, so training and use agree."""
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": context}]
    prompt = safe_chat_template(tokenizer, messages, add_generation_prompt=True)
    return f"{prompt}{activation} {RECALL_TOKEN}"


@dataclasses.dataclass
class RecallTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus step 1's own knobs (defaults tuned on examples/, see README)."""

    output_dir: str = "output"
    learning_rate: float = 1e-3
    num_train_epochs: float = 8.0
    per_device_train_batch_size: int = 16
    warmup_ratio: float = 0.1
    logging_steps: int = 10
    # True (HF's default) tests every step's loss for NaN/inf in Python: a host sync per step on a
    # GPU. A NaN loss is logged as NaN instead of being replaced, which is the better signal anyway.
    logging_nan_inf_filter: bool = False
    save_strategy: str = "epoch"
    save_total_limit: Optional[int] = 1
    temperature: float = dataclasses.field(default=0.01, metadata={"help": "initial InfoNCE temperature"})
    learn_temperature: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str = dataclasses.field(
        default="auto", metadata={"help": "comma-separated module names; 'auto' (recall.lora_targets): every "
                                          "projection of the transformer block with adapter_scope 'recall' (they "
                                          "act at one position: nearly free), the query and value projections with "
                                          "'all' (1.5x faster than all seven there, measured)"})
    adapter_scope: str = dataclasses.field(
        default="recall", metadata={"help": "where the LoRA acts: 'recall' (default) from <recall> on only, an "
                                            "activated adapter (recall/activation.py): the conversation runs on the "
                                            "base model, ordinary chat is unchanged, the context needs no gradient; "
                                            "or 'all' positions, merged into the published weights"})
    max_length: int = dataclasses.field(default=96, metadata={"help": "query tokens, truncated from the left"})
    query_projector: bool = dataclasses.field(default=False, metadata={"help": "force a linear projector"})
    distill_weight: float = dataclasses.field(
        default=1.0, metadata={"help": "weight of the KL term to a teacher's distribution over the bank"})
    vector_distill_weight: float = dataclasses.field(
        default=0.0, metadata={"help": "weight of distilling the teacher encoder's vectors into the <recall> query "
                                       "(1 - cos + in-batch InfoNCE, on every text, labelled or not); needs memory "
                                       "vectors from the teacher's encoder (--embedding_model = --recall_teacher)"})
    vector_distill_temperature: float = 0.05
    abstention: bool = dataclasses.field(
        default=True, metadata={"help": "learn a 'no memory' level: general prompts no memory answers train "
                                        "against an extra class whose logit is a learned cosine, so they score "
                                        "below it and the cues of real memories above it (recall threshold)"})
    abstention_per_cue: float = dataclasses.field(
        default=2.0, metadata={"help": "with abstention: general prompts trained as 'no memory', per labelled cue "
                                       "(at most the bundled 544)"})
    context_cache_mb: float = dataclasses.field(
        default=2048.0, metadata={"help": "with adapter_scope 'recall': keep each context's KV cache (base model, "
                                          "fixed during training) for later epochs, up to this many MB; 0 = off"})
    compile_layers: bool = dataclasses.field(
        default=False, metadata={"help": "torch.compile each transformer block (GPU: fewer launches, fused "
                                         "elementwise work; see recall/compilation.py). Also applies to step 2"})
    remove_unused_columns: bool = False  # the collator needs the raw "text" column
    report_to: Optional[str] = "none"

    def __post_init__(self):
        check_scope(self.adapter_scope)
        check_training_numbers(self)
        check_numbers(self, positive=("abstention_per_cue",))
        default_accelerator = self.accelerator_config is None
        super().__post_init__()
        if default_accelerator:  # batches (pinned by the data loader) go to the GPU without a host sync each
            self.accelerator_config.non_blocking = True


class MemoryBankInfoNCE(nn.Module):
    """InfoNCE over the whole memory bank: -log softmax(q . m_target / T) with every other
    memory as a negative, plus optional distillation: KL(teacher || student) between a
    teacher's distribution over the same bank (e.g. a sentence encoder's) and the
    query's. Inputs: unit queries (B, d), bank (M, d) unit rows, targets (B,) with -1 for
    texts that have no labelled memory, optional teacher probabilities (B, M), and the log
    of the inverse temperature. With ``abstain`` (a learned cosine level), an extra class M
    scores that level for every query: texts no memory answers target M (teacher rows of
    M + 1 put their mass there), so their best memory must score below it and a cue's own
    memory above it."""

    def forward(self, queries, bank, targets, log_scale, teacher=None, distill_weight: float = 1.0,
                teacher_vectors=None, vector_weight: float = 0.0, vector_temperature: float = 0.05, abstain=None):
        scores = queries @ bank.T
        if abstain is not None:  # the "no memory" class: a learned cosine level, the same for every query
            scores = torch.cat([scores, abstain.to(scores.dtype).expand(len(scores), 1)], dim=1)
            if teacher is not None and teacher.shape[1] == bank.shape[0]:
                teacher = F.pad(teacher, (0, 1))
        logits = scores * log_scale.exp().clamp(max=1000.0)
        loss = logits.new_zeros(())
        if (targets >= 0).any():
            loss = loss + F.cross_entropy(logits, targets, ignore_index=-1)
        if teacher is not None and distill_weight > 0:
            kl = F.kl_div(F.log_softmax(logits, dim=-1), teacher, reduction="batchmean")
            loss = loss + distill_weight * kl
        if teacher_vectors is not None and vector_weight > 0:
            loss = loss + vector_weight * vector_distillation(queries, teacher_vectors, vector_temperature)
        return loss


def vector_distillation(queries: torch.Tensor, teacher_vectors: torch.Tensor, temperature: float) -> torch.Tensor:
    """Distil a sentence encoder into the query: ``1 - cos(q_i, t_i)`` plus an in-batch
    InfoNCE (each query must pick its own text's teacher vector among the batch's). Needs no
    label, so any text teaches it; queries and teacher vectors share the memory-vector space."""
    t = F.normalize(teacher_vectors.to(queries.dtype), dim=-1)
    cosine = (queries * t).sum(-1)
    nce = F.cross_entropy(queries @ t.T / temperature, torch.arange(len(queries), device=queries.device))
    return (1 - cosine).mean() + nce


class RecallQueryModel(TrainableStateMixin, nn.Module):
    """LoRA-adapted LM + fp32 token rows + optional projector -> unit query vectors."""

    def __init__(self, lm, token_ids: Sequence[int], memory_dim: int, temperature: float = 0.05,
                 learn_temperature: bool = True, projector: bool = False, adapter_scope: str = "all",
                 abstention: bool = False):
        super().__init__()
        self.lm = lm
        self.adapter_scope = adapter_scope
        self.context_cache: Optional[ContextKVCache] = None  # set by build_recall_model for scope "recall"
        self.config = lm.config
        self.token_rows = install_token_rows(lm.get_base_model() if hasattr(lm, "get_base_model") else lm,
                                             token_ids)
        self.token_rows.delta.requires_grad_(True)
        hidden = lm.config.hidden_size
        self.projector = nn.Linear(hidden, memory_dim) if projector or memory_dim != hidden else None
        # shape (1,), not a 0-d scalar: DeepSpeed broadcasts parameters as bytes, which 0-d tensors cannot be
        self.log_scale = nn.Parameter(torch.tensor([math.log(1.0 / temperature)]),
                                      requires_grad=learn_temperature)
        # the "no memory" cosine level (``abstention``); absent otherwise, so older states load
        self.abstain = nn.Parameter(torch.tensor([ABSTAIN_INIT])) if abstention else None

    def forward(self, input_ids, attention_mask, with_log_scale: bool = False):
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        last = last_token_positions(attention_mask)
        if self.adapter_scope == "recall":
            query = self._recall_position_state(input_ids, attention_mask, rows, last).float()
        else:
            hidden = backbone(self.lm)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            query = hidden[rows, last].float()
        if self.projector is not None:  # its weight is bf16 when DeepSpeed runs in bf16
            query = self.projector(query.to(self.projector.weight.dtype)).float()
        query = F.normalize(query, dim=-1)
        # the temperature is read here, inside forward: under ZeRO-3 a parameter holds its full
        # value only while its module runs
        if not with_log_scale:
            return query
        abstain = None if self.abstain is None else self.abstain.float() * 1.0
        return query, self.log_scale.float() * 1.0, abstain

    def _recall_position_state(self, input_ids, attention_mask, rows, last):
        """Final hidden state at the last token with the adapter acting there only.

        The context (every token before the last) runs through the base model without
        gradient and leaves its KV cache; the last token (``<recall>``) then runs alone with
        the adapter on, attending to that cache at its true position. Rows may be
        right-padded: the last token's own column is masked out of the context pass and it
        is re-fed after the padded width, with its real position id for RoPE. With a
        ``context_cache`` the context pass runs once per distinct context."""
        last_ids, position = input_ids[rows, last][:, None], last
        if self.context_cache is not None and self.context_cache.usable(input_ids, last):
            cache, context_mask, position = self.context_cache.batch(input_ids, attention_mask, last,
                                                                     self._context_pass)
        else:
            context_mask = attention_mask.clone()
            context_mask[rows, last] = 0
            cache = self._context_pass(input_ids, context_mask)
        mask = torch.cat([context_mask, context_mask.new_ones(len(rows), 1)], dim=1)
        with adapter_active(self.lm, [1] * len(rows)):
            out = backbone(self.lm)(input_ids=last_ids, attention_mask=mask, position_ids=position[:, None],
                                    cache=cache, use_cache=True)
        return out.last_hidden_state[:, 0]

    def _context_pass(self, input_ids, attention_mask):
        """The base model's KV cache over the context (no adapter, no gradient)."""
        return base_context_pass(self.lm, input_ids=input_ids, attention_mask=attention_mask).cache


class ContextKVCache:
    """Per-context KV caches of the base model, reused across epochs (``adapter_scope``
    "recall": the context never sees the adapter, so its keys and values are fixed while
    training). Entries are keyed by the context's token ids and hold each layer's keys and
    values for the real tokens only; a batch is assembled right-padded with a matching
    mask. Contexts holding a token whose embedding trains (the memory tokens) are never
    cached. New entries stop once ``budget_mb`` (on the model's device) is used; those
    contexts are recomputed."""

    def __init__(self, config, budget_mb: float, trainable_token_ids: Sequence[int]):
        self.config, self.budget = config, int(budget_mb * 2 ** 20)
        self.trainable = torch.tensor(sorted(trainable_token_ids), dtype=torch.long)
        self.entries: Dict[tuple, list] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    def usable(self, input_ids, last) -> bool:
        for row, end in enumerate(last.tolist()):
            if end == 0 or torch.isin(input_ids[row, :end], self.trainable.to(input_ids.device)).any():
                return False
        return True

    def batch(self, input_ids, attention_mask, last, context_pass, with_hidden: bool = False):
        """(cache, context mask, position of the last token) for the batch: each row's real
        context tokens (attended, before ``last``) from left to right, then padding.

        ``with_hidden`` (step 2, which also reads the context's final states): ``context_pass``
        returns ``(cache, last hidden states)``, entries keep both, and the result gains the
        (B, width, d) states, zero on padding."""
        keys = [tuple(input_ids[row, :end][attention_mask[row, :end].bool()].tolist())
                for row, end in enumerate(last.tolist())]
        missing = [i for i, k in enumerate(keys) if k not in self.entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            width = max(len(keys[i]) for i in missing)
            ids = input_ids.new_zeros(len(missing), width)
            mask = input_ids.new_zeros(len(missing), width)
            for j, i in enumerate(missing):
                ids[j, :len(keys[i])] = torch.tensor(keys[i], dtype=ids.dtype)
                mask[j, :len(keys[i])] = 1
            cache = context_pass(ids, mask)
            states = None
            if with_hidden:
                cache, states = cache
            for j, i in enumerate(missing):
                n = len(keys[i])
                entry = [(layer.keys[j, :, :n].clone(), layer.values[j, :, :n].clone()) for layer in cache.layers]
                if states is not None:
                    entry.append(states[j, :n].clone())  # after the layers: the context's final states
                fresh[keys[i]] = entry
                size = sum(t.numel() * t.element_size() for t in _tensors(entry))
                if keys[i] not in self.entries and self.bytes + size <= self.budget:
                    self.entries[keys[i]] = entry
                    self.bytes += size
        rows = [fresh.get(k) or self.entries[k] for k in keys]
        if with_hidden and any(not torch.is_tensor(r[-1]) for r in rows):
            raise RuntimeError("a context cache entry has no hidden states (filled by step 1's model?)")
        width = max(len(k) for k in keys)
        mask = input_ids.new_zeros(len(keys), width)
        layers = []
        n_layers = len(rows[0]) - (1 if with_hidden else 0)
        for layer in range(n_layers):
            k0 = rows[0][layer][0]
            k = k0.new_zeros(len(keys), k0.shape[0], width, k0.shape[-1])
            v = torch.zeros_like(k)
            for b, entry in enumerate(rows):
                n = entry[layer][0].shape[1]
                k[b, :, :n], v[b, :, :n] = entry[layer]
                mask[b, :n] = 1
            layers.append((k, v))
        from transformers import DynamicCache

        lengths = torch.tensor([len(k) for k in keys], device=input_ids.device)
        cache = DynamicCache(ddp_cache_data=layers, config=self.config)
        if not with_hidden:
            return cache, mask, lengths
        h0 = rows[0][-1]
        hidden = h0.new_zeros(len(keys), width, h0.shape[-1])
        for b, entry in enumerate(rows):
            hidden[b, :entry[-1].shape[0]] = entry[-1]
        return cache, mask, lengths, hidden


def _tensors(entry):
    for item in entry:
        if torch.is_tensor(item):
            yield item
        else:
            yield from item


class RecallCollator:
    """Tokenise ``text`` (already formatted, ending in ``<recall>``), keep the *last*
    ``max_length`` tokens so those next to ``<recall>`` survive, right-pad."""

    def __init__(self, tokenizer, recall_token_id: int, max_length: int):
        self.tokenizer, self.recall_id, self.max_length = tokenizer, recall_token_id, max_length

    def __call__(self, features: List[dict]) -> Dict[str, torch.Tensor]:
        ids = self.tokenizer([f["text"] for f in features], add_special_tokens=False)["input_ids"]
        ids = [seq[-self.max_length:] for seq in ids]
        for seq, f in zip(ids, features):
            if not seq or seq[-1] != self.recall_id:
                raise ValueError(f"query does not end with {RECALL_TOKEN}: {f['text'][-80:]!r}")
        width = max(len(s) for s in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in ids])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids])
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if "target" in features[0]:
            batch["targets"] = torch.tensor([f["target"] for f in features])
        if all(f.get("teacher") is not None for f in features):
            batch["teacher"] = torch.tensor([f["teacher"] for f in features], dtype=torch.float32)
        if all(f.get("teacher_vector") is not None for f in features):
            batch["teacher_vectors"] = torch.tensor([f["teacher_vector"] for f in features], dtype=torch.float32)
        return batch


def retrieval_metrics(ranks: Sequence[int]) -> Dict[str, float]:
    """recall@1, recall@5, recall@10 and MRR from 1-based ranks of the right memory."""
    n = max(len(ranks), 1)
    return {"recall_at_1": sum(r == 1 for r in ranks) / n, "recall_at_5": sum(r <= 5 for r in ranks) / n,
            "recall_at_10": sum(r <= 10 for r in ranks) / n,
            "mrr": sum(1.0 / r for r in ranks) / n, "n": len(ranks)}


def positive_ranks(scores: torch.Tensor, positives: Sequence[Sequence[int]]) -> List[int]:
    """1-based rank of each query's best right memory, where ``positives[i]`` are every memory
    query ``i`` is a cue of: 1 + the wrong memories scoring above the best right one."""
    right = torch.zeros_like(scores, dtype=torch.bool)
    for i, rows in enumerate(positives):
        right[i, list(rows)] = True
    best = scores.masked_fill(~right, float("-inf")).max(1).values
    return ((scores > best[:, None]) & ~right).sum(1).add(1).tolist()


class RecallMemoryTrainer(SmallStateTrainerMixin, Trainer):
    """``Trainer`` for step 1. ``memory_bank``: (M, d) memory vectors (fixed targets);
    datasets hold ``{"text": formatted query, "target": row in the bank}``. ``bank_users``: the
    user of each bank row; ``evaluate`` then ranks a cue with a ``user`` among that user's
    memories only, as the recall loop searches."""

    STATE_FILE = TRAINABLE_STATE  # only the small trainable state is saved (SmallStateTrainerMixin)

    def __init__(self, model: RecallQueryModel, args: RecallTrainingArguments, memory_bank: torch.Tensor,
                 tokenizer, recall_token_id: int, bank_users: Optional[Sequence[str]] = None, **kwargs):
        kwargs.setdefault("data_collator", RecallCollator(tokenizer, recall_token_id, args.max_length))
        if bank_users is not None and len(bank_users) != len(memory_bank):
            raise ValueError(f"bank_users: {len(bank_users)} users for {len(memory_bank)} memory vectors")
        self.bank_users = list(bank_users) if bank_users is not None else None
        prepare_deepspeed_args(args)
        super().__init__(model=model, args=args, processing_class=tokenizer, **kwargs)
        self.recall_token_id = recall_token_id
        self.memory_bank = F.normalize(memory_bank.float(), dim=-1)
        self.loss_fn = MemoryBankInfoNCE()
        # the "no memory" class enters the loss only when some text targets it (row M)
        m = len(self.memory_bank)
        self.abstain_trained = self.train_dataset is not None and any(d["target"] == m for d in self.train_dataset)

    def _bank(self, device) -> torch.Tensor:
        if self.memory_bank.device != device:
            self.memory_bank = self.memory_bank.to(device)
        return self.memory_bank

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        queries, log_scale, abstain = model(inputs["input_ids"], inputs["attention_mask"], with_log_scale=True)
        loss = self.loss_fn(queries, self._bank(queries.device), inputs["targets"], log_scale,
                            inputs.get("teacher"), self.args.distill_weight, inputs.get("teacher_vectors"),
                            self.args.vector_distill_weight, self.args.vector_distill_temperature,
                            abstain if self.abstain_trained else None)
        return (loss, queries) if return_outputs else loss

    def train(self, resume_from_checkpoint=None, **kwargs):
        from recall.cpu_bf16 import bf16_cpu_training

        if resume_from_checkpoint is None:
            self.init_abstain_level()
        with bf16_cpu_training(self.model, self.args, self.args.device):  # CPU bf16 autocast: recall/cpu_bf16.py
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    @torch.no_grad()
    def init_abstain_level(self, sample: int = 128) -> Optional[float]:
        """Start the "no memory" level between the two groups it must separate: halfway from
        the median best-memory cosine of the "no memory" texts to that of the labelled cues'
        own memory, for the untrained query (a fixed start would need many steps to reach
        the encoder's cosine range)."""
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        if getattr(model, "abstain", None) is None or self.train_dataset is None:
            return None
        from recall.distributed import zero3_partitioned

        if zero3_partitioned([model.abstain]):
            return None  # a partitioned scalar: keep the fixed start
        m = len(self.memory_bank)
        none = [d["text"] for d in self.train_dataset if d["target"] == m][:sample]
        cues = [d for d in self.train_dataset if 0 <= d["target"] < m][:sample]
        if not none or not cues:
            return None
        bank = self._bank(torch.device("cpu"))
        none_best = (self.query_vectors(none) @ bank.T).max(1).values.median()
        own = (self.query_vectors([d["text"] for d in cues]) * bank[[d["target"] for d in cues]]).sum(1).median()
        level = float((none_best + own) / 2)
        model.abstain.data.fill_(level)
        logger.info("step 1: 'no memory' level starts at %.3f (median best cosine: general prompts %.3f, "
                    "cues' own memory %.3f)", level, float(none_best), float(own))
        return level

    @torch.no_grad()
    def query_vectors(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        model = self.model
        was_training = model.training
        model.eval()
        collate = RecallCollator(self.processing_class, self.recall_token_id, self.args.max_length)
        device = next(model.parameters()).device

        def encode(chunk: List[str]) -> torch.Tensor:
            batch = collate([{"text": t} for t in chunk])
            with self.autocast_smart_context_manager():
                return model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()

        try:  # each distinct text once, batched by length
            return encode_by_length(list(texts), encode, batch_size) if len(texts) else \
                torch.empty(0, self.memory_bank.shape[1])
        finally:
            model.train(was_training)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> Dict[str, float]:
        """recall@k and MRR of labelled cues. A text that is a cue of several memories (a message
        stating two facts; ``recall.kfold.with_positives`` lists them in ``positives``) counts once,
        and a hit on any of its memories counts; ``strict_*`` counts every (text, memory) pair and
        only its own memory."""
        data = eval_dataset if eval_dataset is not None else self.eval_dataset
        data = [d for d in data if 0 <= d["target"] < len(self.memory_bank)]  # labelled cues, not "no memory"
        queries = self.query_vectors([d["text"] for d in data])
        scores = queries @ self._bank(queries.device).T
        if self.bank_users is not None:  # a user's query competes with that user's memories only
            users = torch.tensor([[d.get("user") in (None, u) for u in self.bank_users] for d in data],
                                 device=scores.device).reshape(scores.shape)
            scores = scores.masked_fill(~users, float("-inf"))
        first: Dict[tuple, int] = {}
        for i, d in enumerate(data):
            first.setdefault((d.get("user"), d["text"]), i)
        rows = sorted(first.values())
        ranks = positive_ranks(scores[rows], [data[i].get("positives") or [data[i]["target"]] for i in rows])
        strict = positive_ranks(scores, [[d["target"]] for d in data])
        self.eval_misses = [{"cue": data[i].get("raw", data[i]["text"]), "positives": data[i].get("positives") or
                             [data[i]["target"]], "top": int(scores[i].argmax()), "rank": r}
                            for i, r in zip(rows, ranks) if r > 1]  # for diagnostics (K-fold lists them)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in retrieval_metrics(ranks).items()}
        metrics.update({f"{metric_key_prefix}_strict_{k}": v for k, v in retrieval_metrics(strict).items()
                        if k in ("recall_at_1", "mrr", "n")})
        self.log(metrics)
        return metrics

def build_recall_model(lm, tokenizer, args: RecallTrainingArguments, memory_dim: int,
                       token_ids: Sequence[int], adapter_state: Optional[dict] = None) -> RecallQueryModel:
    """Wrap ``lm`` with LoRA (``args.lora_*``; an activated LoRA for ``adapter_scope``
    "recall", see ``recall.activation``) and fp32 token rows for ``token_ids``.
    ``adapter_state``: LoRA weights to continue (an incremental cycle on an activated version)."""
    from peft import get_peft_model

    targets = resolve_targets(lm, args.lora_target_modules, args.adapter_scope)
    lora = lora_config(targets, args.lora_r, args.lora_alpha, args.lora_dropout, args.adapter_scope,
                       tokenizer.convert_tokens_to_ids(RECALL_TOKEN))
    peft_lm = get_peft_model(lm, lora)
    if adapter_state:
        load_lora_state(peft_lm, adapter_state, "the current version's memory adapter (--full starts afresh)")
    if args.adapter_scope == "recall":
        use_fast_forward(peft_lm)  # the lean aLoRA forward: plain LoRA on the tail passes
    if args.compile_layers:
        from recall.compilation import compile_layers

        compile_layers(peft_lm, args.deepspeed)
    model = RecallQueryModel(peft_lm, token_ids, memory_dim, args.temperature, args.learn_temperature,
                             args.query_projector, args.adapter_scope, args.abstention)
    from transformers.integrations import is_deepspeed_zero3_enabled

    # under ZeRO-3 every rank must run the same modules in step (parameter gathers are
    # collective): a cache hit on one rank and a miss on another would hang, so no cache there
    if args.adapter_scope == "recall" and args.context_cache_mb > 0 and not is_deepspeed_zero3_enabled():
        model.context_cache = ContextKVCache(lm.config, args.context_cache_mb, token_ids)
    return model


def load_recall_model(run_dir, *, device: str = "auto", precision: str = "auto"):
    """Rebuild a trained query model from a step-1 output directory.

    Returns ``(RecallQueryModel, tokenizer, LoadedModel of the base)``. The base weights come
    from where training read them (``recall_config.json``); the tokenizer (with the memory
    tokens) and the trained state come from ``run_dir``."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from recall.model_loading import load_model_and_tokenizer

    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "recall_config.json").read_text())
    base_name = str(Path(cfg["base_model"], cfg["base_gguf_file"])) if cfg.get("base_gguf_file") else cfg["base_model"]
    loaded = load_model_and_tokenizer(base_name, device=device, precision=precision)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in cfg["token_ids"]}
    if ids != cfg["token_ids"]:
        raise ValueError(f"{run_dir}: tokenizer ids {ids} differ from training's {cfg['token_ids']}")
    rows = loaded.model.get_input_embeddings().weight.shape[0]
    if max(ids.values()) >= rows:
        loaded.model.resize_token_embeddings(max(ids.values()) + 1, pad_to_multiple_of=64, mean_resizing=False)
    args = RecallTrainingArguments(output_dir=str(run_dir), lora_r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"],
                                   lora_target_modules=cfg["lora_target_modules"], max_length=cfg["max_length"],
                                   query_projector=cfg["query_projector"],
                                   adapter_scope=cfg.get("adapter_scope", "all"),
                                   abstention=False)  # the "no memory" level is a training target only
    state = load_file(str(run_dir / TRAINABLE_STATE))
    memory_dim = next((v.shape[0] for k, v in state.items() if k.endswith("projector.weight")),
                      loaded.model.config.hidden_size)
    model = build_recall_model(loaded.model, tokenizer, args, memory_dim, list(ids.values()))
    model.load_trainable_state(state)
    model.to(loaded.runtime.device).eval()
    return model, tokenizer, loaded, args
