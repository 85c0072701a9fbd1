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
from recall.distributed import prepare_deepspeed_args
from recall.get_text_embedding import backbone, last_token_positions
from recall.token_rows import SmallStateTrainerMixin, TrainableStateMixin, install_token_rows

logger = logging.getLogger(__name__)

ACTIVATION_PHRASE = "Let me check my memory."
TRAINABLE_STATE = "recall_state.safetensors"


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
    save_strategy: str = "epoch"
    save_total_limit: Optional[int] = 1
    temperature: float = dataclasses.field(default=0.01, metadata={"help": "initial InfoNCE temperature"})
    learn_temperature: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str = "q_proj,v_proj"  # 1.5x faster than all seven, measured
    max_length: int = dataclasses.field(default=96, metadata={"help": "query tokens, truncated from the left"})
    query_projector: bool = dataclasses.field(default=False, metadata={"help": "force a linear projector"})
    distill_weight: float = dataclasses.field(
        default=1.0, metadata={"help": "weight of the KL term to a teacher's distribution over the bank"})
    vector_distill_weight: float = dataclasses.field(
        default=0.0, metadata={"help": "weight of distilling the teacher encoder's vectors into the <recall> query "
                                       "(1 - cos + in-batch InfoNCE, on every text, labelled or not); needs memory "
                                       "vectors from the teacher's encoder (--embedding_model = --recall_teacher)"})
    vector_distill_temperature: float = 0.05
    compile_layers: bool = dataclasses.field(
        default=False, metadata={"help": "torch.compile each transformer block (GPU: fewer launches, fused "
                                         "elementwise work; see recall/compilation.py). Also applies to step 2"})
    remove_unused_columns: bool = False  # the collator needs the raw "text" column
    report_to: Optional[str] = "none"


class MemoryBankInfoNCE(nn.Module):
    """InfoNCE over the whole memory bank: -log softmax(q . m_target / T) with every other
    memory as a negative, plus optional distillation: KL(teacher || student) between a
    teacher's distribution over the same bank (e.g. a sentence encoder's) and the
    query's. Inputs: unit queries (B, d), bank (M, d) unit rows, targets (B,) with -1 for
    texts that have no labelled memory, optional teacher probabilities (B, M), and the log
    of the inverse temperature."""

    def forward(self, queries, bank, targets, log_scale, teacher=None, distill_weight: float = 1.0,
                teacher_vectors=None, vector_weight: float = 0.0, vector_temperature: float = 0.05):
        logits = queries @ bank.T * log_scale.exp().clamp(max=1000.0)
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
                 learn_temperature: bool = True, projector: bool = False):
        super().__init__()
        self.lm = lm
        self.config = lm.config
        self.token_rows = install_token_rows(lm.get_base_model() if hasattr(lm, "get_base_model") else lm,
                                             token_ids)
        self.token_rows.delta.requires_grad_(True)
        hidden = lm.config.hidden_size
        self.projector = nn.Linear(hidden, memory_dim) if projector or memory_dim != hidden else None
        # shape (1,), not a 0-d scalar: DeepSpeed broadcasts parameters as bytes, which 0-d tensors cannot be
        self.log_scale = nn.Parameter(torch.tensor([math.log(1.0 / temperature)]),
                                      requires_grad=learn_temperature)

    def forward(self, input_ids, attention_mask, with_log_scale: bool = False):
        hidden = backbone(self.lm)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        query = hidden[rows, last_token_positions(attention_mask)].float()
        if self.projector is not None:  # its weight is bf16 when DeepSpeed runs in bf16
            query = self.projector(query.to(self.projector.weight.dtype)).float()
        query = F.normalize(query, dim=-1)
        # the temperature is read here, inside forward: under ZeRO-3 a parameter holds its full
        # value only while its module runs
        return (query, self.log_scale.float() * 1.0) if with_log_scale else query


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


class RecallMemoryTrainer(SmallStateTrainerMixin, Trainer):
    """``Trainer`` for step 1. ``memory_bank``: (M, d) memory vectors (fixed targets);
    datasets hold ``{"text": formatted query, "target": row in the bank}``."""

    STATE_FILE = TRAINABLE_STATE  # only the small trainable state is saved (SmallStateTrainerMixin)

    def __init__(self, model: RecallQueryModel, args: RecallTrainingArguments, memory_bank: torch.Tensor,
                 tokenizer, recall_token_id: int, **kwargs):
        kwargs.setdefault("data_collator", RecallCollator(tokenizer, recall_token_id, args.max_length))
        prepare_deepspeed_args(args)
        super().__init__(model=model, args=args, processing_class=tokenizer, **kwargs)
        self.recall_token_id = recall_token_id
        self.memory_bank = F.normalize(memory_bank.float(), dim=-1)
        self.loss_fn = MemoryBankInfoNCE()

    def _bank(self, device) -> torch.Tensor:
        if self.memory_bank.device != device:
            self.memory_bank = self.memory_bank.to(device)
        return self.memory_bank

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        queries, log_scale = model(inputs["input_ids"], inputs["attention_mask"], with_log_scale=True)
        loss = self.loss_fn(queries, self._bank(queries.device), inputs["targets"], log_scale,
                            inputs.get("teacher"), self.args.distill_weight, inputs.get("teacher_vectors"),
                            self.args.vector_distill_weight, self.args.vector_distill_temperature)
        return (loss, queries) if return_outputs else loss

    @torch.no_grad()
    def query_vectors(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        model = self.model
        was_training = model.training
        model.eval()
        collate = RecallCollator(self.processing_class, self.recall_token_id, self.args.max_length)
        device = next(model.parameters()).device
        out = []
        for start in range(0, len(texts), batch_size):
            batch = collate([{"text": t} for t in texts[start:start + batch_size]])
            with self.autocast_smart_context_manager():
                out.append(model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu())
        model.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.memory_bank.shape[1])

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> Dict[str, float]:
        data = eval_dataset if eval_dataset is not None else self.eval_dataset
        data = [d for d in data if d["target"] >= 0]
        queries = self.query_vectors([d["text"] for d in data])
        scores = queries @ self._bank(queries.device).T
        targets = torch.tensor([d["target"] for d in data])
        target_scores = scores[torch.arange(len(targets)), targets]
        ranks = (scores > target_scores[:, None]).sum(1) + 1
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in retrieval_metrics(ranks.tolist()).items()}
        self.log(metrics)
        return metrics

def build_recall_model(lm, tokenizer, args: RecallTrainingArguments, memory_dim: int,
                       token_ids: Sequence[int]) -> RecallQueryModel:
    """Wrap ``lm`` with LoRA (``args.lora_*``) and fp32 token rows for ``token_ids``."""
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, bias="none")
    peft_lm = get_peft_model(lm, lora)
    if args.compile_layers:
        from recall.compilation import compile_layers

        compile_layers(peft_lm, args.deepspeed)
    return RecallQueryModel(peft_lm, token_ids, memory_dim, args.temperature, args.learn_temperature,
                            args.query_projector)


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
                                   query_projector=cfg["query_projector"])
    state = load_file(str(run_dir / TRAINABLE_STATE))
    memory_dim = next((v.shape[0] for k, v in state.items() if k.endswith("projector.weight")),
                      loaded.model.config.hidden_size)
    model = build_recall_model(loaded.model, tokenizer, args, memory_dim, list(ids.values()))
    model.load_trainable_state(state)
    model.to(loaded.runtime.device).eval()
    return model, tokenizer, loaded, args
