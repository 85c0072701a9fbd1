"""Step 2: memory decoding (``EnhancedTextMemoryTrainer``).

The model learns to read a memory vector, injected as the input embedding at
``<|memory_pad|>``, back into the memory's text::

    context · activation phrase · <recall> · <|memory_pad|> · memory text · </recall> [· continuation]

- **Injection** (``MemoryDecoderModel.embed``): the embedding at every ``<|memory_pad|>``
  is *replaced* by ``projector(memory vector)``. The projector unit-normalises the vector,
  scales it to the mean norm of the embedding rows, and adds a small residual MLP
  (initialised to zero, so training starts from the plain rescaled vector). Gaussian noise
  in training is small by default (``noise_std`` 0.005). Memory vectors travel as one flat
  ``(n_pads, d)`` tensor in the order the pads appear in the batch, so batches mixing memory
  and SFT samples work.
- **Labels**: ``<recall>`` (the model learns to ask after the activation phrase), the
  memory text, ``</recall>`` and the continuation; context, phrase and pad are -100.
- **Loss**: next-token cross-entropy, with the LM head applied only at labelled positions
  (the 49k-wide projection of unlabelled context positions is skipped), plus
  ``recall_loss_weight`` x the step-1 InfoNCE at ``<recall>`` for samples whose context
  is a cue of the injected memory: this holds the ``<recall>`` query in place while the
  LoRA learns to decode (step 2 would otherwise move it; see README "Step 2").
- **Trainable**: LoRA, the projector, and fp32 rows for the new tokens (input side via
  ``recall.token_rows``; the output side adds ``h @ delta.T`` to the new tokens' logits,
  so a tied head sees the same rows it will hold after merging).

Why ``transformers.Trainer`` and not TRL's ``SFTTrainer``: ``SFTTrainer`` tokenises
``messages``/``text`` columns itself and computes the loss from token ids. Our samples
are built from token segments with exact label masks and carry a memory vector that
replaces an input embedding, so its dataset preparation, collator and ``compute_loss``
would all be overridden; what would remain is ``Trainer``. The SFT *data* formats TRL
accepts (``messages``, ``prompt``/``completion``) are read by ``memory.sft_data``.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from recall.arg_checks import check_training_numbers
from recall.activation import (adapter_active, base_context_pass, check_scope, load_lora_state, lora_config,
                               use_fast_forward)
from recall.distributed import prepare_deepspeed_args
from recall.get_text_embedding import backbone, encode_by_length
from recall.lora_targets import resolve_targets
from recall.token_rows import SmallStateTrainerMixin, TrainableStateMixin, install_token_rows

logger = logging.getLogger(__name__)

IGNORE = -100
DECODER_STATE = "decoder_state.safetensors"


@dataclasses.dataclass
class MemoryDecodingArguments(TrainingArguments):
    """``TrainingArguments`` plus step 2's knobs."""

    output_dir: str = "output"
    learning_rate: float = 2e-3
    # The budget is optimizer steps, never a stop measured on the memories being trained: 8 epochs
    # of the mix, and at least ``min_steps`` steps, because learning to read a vector at all takes
    # a number of steps whatever the bank's size. Measured on LoCoMo facts (decode_exact_match by
    # epoch, the teacher-forced check): 5 memories read exactly after 16 steps, 20 after 170, 100
    # reached 0.99 after 300 (8 epochs); 60 steps left 20 memories at 0.25.
    num_train_epochs: float = 8.0
    min_steps: int = dataclasses.field(
        default=250, metadata={"help": "at least this many optimizer steps: a small cycle gets more epochs (0: off)"})
    per_device_train_batch_size: int = 8
    warmup_ratio: float = 0.05
    lr_scheduler_type: str = "cosine"
    logging_steps: int = 10
    # True (HF's default) tests every step's loss for NaN/inf in Python: a host sync per step on a
    # GPU. A NaN loss is logged as NaN instead of being replaced, which is the better signal anyway.
    logging_nan_inf_filter: bool = False
    save_strategy: str = "epoch"
    save_total_limit: Optional[int] = 1
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str = dataclasses.field(
        default="auto", metadata={"help": "auto: the block's projections but a separate key and gate projection "
                                          "(Llama: q,v,o,up,down_proj); recall.lora_targets"})
    projector_hidden: int = dataclasses.field(default=1024, metadata={"help": "0: rescale only, no MLP"})
    # little noise: the injected vector is the stored one, exactly. N(0, 0.01) per coordinate
    # slowed learning to tell close memories apart (100 LoCoMo facts: exact match 0.945; 0.986
    # with 0.005 or none), and none at all cost answers on the dev chats (chat.py's final hit
    # 0.694 against 0.755 with 0.005 or 0.01): docs/step2.md#exact-match-by-bank-size
    noise_std: float = dataclasses.field(default=0.005, metadata={"help": "Gaussian noise on the unit memory vector "
                                                                         "in training (std per coordinate)"})
    max_length: int = dataclasses.field(default=192, metadata={"help": "tokens per sample; context cut from the left"})
    # two answer samples per memory: with one, the answer after a recall drifted from the memory on
    # questions unlike the rule-made ones (chat.py's answers held the fact for 0.673 of the dev
    # questions against 0.755 with two, same step 1)
    mix: str = dataclasses.field(default="1:1:2:2", metadata={"help": "samples per memory per epoch: memory:sandwich:sft[:answer]"})
    # memories whose vector has a close neighbour are the ones that decode as that neighbour (on
    # 100 LoCoMo facts, 3 of the 4 failures had a neighbour at centred cosine >= 0.77; the median
    # memory's nearest is at 0.50): they get more memory samples
    neighbour_cosine: float = dataclasses.field(
        default=0.7, metadata={"help": "a memory whose nearest other memory vector (centred, as injected) has at least "
                                       "this cosine gets --decode_neighbour_samples more memory samples per epoch"})
    neighbour_samples: int = dataclasses.field(
        default=2, metadata={"help": "extra memory samples per epoch for a memory with a close neighbour (0: off)"})
    recall_loss_weight: float = dataclasses.field(
        default=0.0, metadata={"help": "weight of the step-1 InfoNCE at <recall> on memory samples"})
    preserve_weight: float = dataclasses.field(
        default=10.0, metadata={"help": "weight of 1 - cos(<recall> state, step-1 query) on every sample with <recall>"})
    kd_weight: float = dataclasses.field(
        default=3.0, metadata={"help": "weight of KL(base || model) on SFT answers (base top-k log-probs)"})
    recall_temperature: float = 0.05
    length_grouped: bool = dataclasses.field(
        default=True, metadata={"help": "batches of similar-length samples (batch order shuffled): less padding, "
                                        "step 2 about 20%% faster. With --adapter_scope all it cost forgetting in the "
                                        "one pipeline run measured; an activated adapter cannot forget"})
    pad_to_multiple_of: int = dataclasses.field(
        default=1, metadata={"help": "round batch widths up to this (GPU: fewer shapes for cuDNN attention)"})
    head_on_all_positions: bool = dataclasses.field(
        default=False, metadata={"help": "benchmark baseline only: the 49k-wide LM head on every position, "
                                         "as a plain causal-LM loss computes it (same loss, more work)"})
    compile_layers: bool = dataclasses.field(
        default=False, metadata={"help": "torch.compile each transformer block (see recall/compilation.py)"})
    context_cache_mb: float = dataclasses.field(
        default=2048.0, metadata={"help": "with adapter_scope 'recall': keep each context's base-model KV cache and "
                                          "final states (fixed while training) for later epochs, up to this many MB; "
                                          "0 = off (recall.text_embedding_train.ContextKVCache)"})
    packing: bool = dataclasses.field(
        default=False, metadata={"help": "GPU: lay each batch's samples end to end in one row, no padding, with "
                                         "variable-length attention (recall/packing.py); needs adapter_scope all"})
    adapter_scope: str = dataclasses.field(
        default="all", metadata={"help": "set from step 1: 'recall' continues step 1's activated adapter, which acts "
                                         "from <recall> on only (recall.activation); the context runs without "
                                         "gradient and pure SFT samples are dropped (they would train nothing)"})
    stop_at_exact_match: float = dataclasses.field(
        default=0.0, metadata={"help": "stop training at the end of the first epoch where this share of the "
                                        "memories decodes exactly (EnhancedTextMemoryTrainer.decode_check); "
                                        "0 (the default): check and log every epoch, train the whole budget"})
    dataloader_persistent_workers: bool = dataclasses.field(
        default=False, metadata={"help": "must stay off: the samples are redrawn every epoch in the training "
                                         "process, and persistent workers would keep serving the first draw"})
    remove_unused_columns: bool = False
    report_to: Optional[str] = "none"

    def __post_init__(self):
        check_scope(self.adapter_scope)
        check_training_numbers(self, prefix="(step 2) ")
        if self.packing and self.adapter_scope == "recall":
            raise ValueError("packing (--decode_packing) needs adapter_scope 'all': the activated adapter runs the "
                             "context and the tail as two passes over padded rows (use --adapter_scope all in step 1)")
        if self.noise_std < 0:
            raise ValueError(f"noise_std (--decode_noise_std): expected a standard deviation >= 0, got {self.noise_std}")
        if not 0.0 <= self.stop_at_exact_match <= 1.0:
            raise ValueError(f"stop_at_exact_match (--decode_stop_at_exact_match): expected a share in [0, 1], "
                             f"got {self.stop_at_exact_match}")
        if self.dataloader_persistent_workers and self.dataloader_num_workers > 0:
            raise ValueError("dataloader_persistent_workers: step 2 redraws its samples every epoch in the training "
                             "process, and persistent data-loader workers would keep the first epoch's samples; "
                             "leave it off (workers are started afresh each epoch)")
        default_accelerator = self.accelerator_config is None
        super().__post_init__()
        if default_accelerator:  # batches (pinned by the data loader) go to the GPU without a host sync each
            self.accelerator_config.non_blocking = True


class MemoryProjector(nn.Module):
    """Memory vector (d_mem) -> an input embedding (d_model) at the embedding scale."""

    def __init__(self, memory_dim: int, hidden_size: int, embed_norm: float, mlp_hidden: int = 1024):
        super().__init__()
        self.memory_dim, self.hidden_size = memory_dim, hidden_size
        self.register_buffer("embed_norm", torch.tensor(float(embed_norm)))
        # LLM last-token vectors share one dominant direction (mean pairwise cosine ~0.87 for
        # the default keys); subtracting their mean leaves what tells memories apart
        self.register_buffer("center", torch.zeros(memory_dim))
        self.linear = nn.Linear(memory_dim, hidden_size, bias=False) if memory_dim != hidden_size else None
        if self.linear is not None:
            nn.init.orthogonal_(self.linear.weight)
        self.mlp = None
        if mlp_hidden > 0:
            self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, hidden_size))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, vectors: torch.Tensor, noise_std: float = 0.0) -> torch.Tensor:
        if vectors.shape[-1] != self.memory_dim:
            raise ValueError(f"memory vectors have width {vectors.shape[-1]}, this model's projector expects "
                             f"{self.memory_dim} (was the memory DB built with another encoder?)")
        x = F.normalize(F.normalize(vectors.float(), dim=-1) - self.center, dim=-1)
        if noise_std > 0:
            x = F.normalize(x + noise_std * torch.randn_like(x), dim=-1)
        # the layers are bf16 when DeepSpeed runs in bf16 (it casts the module); the rest stays fp32
        if self.linear is not None:
            x = F.normalize(self.linear(x.to(self.linear.weight.dtype)).float(), dim=-1)
        if self.mlp is not None:
            x = x + self.mlp(x.to(self.mlp[0].weight.dtype)).float()
        return x * self.embed_norm.float()

    @torch.no_grad()
    def fit_center(self, vectors: torch.Tensor) -> None:
        """Set the centre to the mean of unit ``vectors`` (the bank plus reference texts)."""
        self.center.copy_(F.normalize(vectors.float(), dim=-1).mean(dim=0).to(self.center.device))


class MemoryDecoderModel(TrainableStateMixin, nn.Module):
    """LoRA-adapted causal LM + fp32 new-token rows + memory projector."""

    extra_state_buffers = ("projector.embed_norm", "projector.center")

    def __init__(self, lm, token_ids: Dict[str, int], memory_dim: int, projector_hidden: int = 1024,
                 noise_std: float = 0.0, memory_bank: Optional[torch.Tensor] = None,
                 recall_temperature: float = 0.05):
        super().__init__()
        from memory.token_manager import MEMORY_PAD_TOKEN, RECALL_END_TOKEN, RECALL_TOKEN

        self.lm = lm
        self.config = lm.config
        self.recall_id = token_ids[RECALL_TOKEN]
        self.end_id = token_ids[RECALL_END_TOKEN]
        self.pad_id = token_ids[MEMORY_PAD_TOKEN]
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        self.token_rows = install_token_rows(base, [self.recall_id, self.end_id, self.pad_id])
        self.token_rows.delta.requires_grad_(True)
        weight = self.token_rows.embedding.weight.detach().float()
        real = weight[: min(weight.shape[0], self.recall_id)]
        self.projector = MemoryProjector(memory_dim, lm.config.hidden_size, real.norm(dim=-1).mean().item(),
                                         projector_hidden)
        head = base.get_output_embeddings()
        self.tied = head is not None and head.weight.data_ptr() == self.token_rows.embedding.weight.data_ptr()
        # untied heads get their own fp32 delta for the new tokens' output rows
        self.head_delta = None if self.tied else nn.Parameter(torch.zeros_like(self.token_rows.delta))
        self.noise_std = noise_std
        self.recall_scale = 1.0 / recall_temperature
        self.register_buffer("memory_bank", None if memory_bank is None
                             else F.normalize(memory_bank.float(), dim=-1), persistent=False)
        # weights of the loss parts; forward returns their weighted sum as "loss"
        self.loss_weights = {"lm": 1.0, "recall": 0.0, "preserve": 0.0, "kd": 0.0}
        self.head_on_all_positions = False  # the naive baseline's LM head (see MemoryDecodingArguments)
        self.adapter_scope = "all"  # "recall": an activated adapter (see hidden_states)
        self.context_cache = None  # a ContextKVCache for the activated adapter's context pass (build_decoder_model)

    # -------------------------------------------------------------- forward
    def embed(self, input_ids: torch.Tensor, memory_vectors: Optional[torch.Tensor],
              pad_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings with every ``<|memory_pad|>`` replaced by its projected vector.
        ``pad_index``: the pads' flat positions (row * width + column, row-major), when the
        collator has them (``index_plan``); else they are found here, at the cost of a host sync."""
        emb = self.token_rows(input_ids)
        if pad_index is None:
            rows, cols = (input_ids == self.pad_id).nonzero(as_tuple=True)
            pad_index = rows * input_ids.shape[1] + cols
        n_pads = pad_index.numel()
        n_vec = 0 if memory_vectors is None else memory_vectors.shape[0]
        if n_pads != n_vec:
            raise ValueError(f"{n_pads} <|memory_pad|> positions but {n_vec} memory vectors")
        if n_pads:
            injected = self.projector(memory_vectors.to(emb.device), self.noise_std if self.training else 0.0)
            emb = emb.flatten(0, 1).index_put((pad_index,), injected.to(emb.dtype)).view_as(emb)
        elif self.training:
            # a batch without memories would leave the projector without gradients; data-parallel
            # training (DeepSpeed, DDP) needs the same gradients, in the same order, on every rank
            dummy = self.projector(emb.new_ones(1, self.projector.memory_dim).float())
            emb = emb + 0.0 * dummy.sum().to(emb.dtype)
        return emb

    def hidden_states(self, input_ids, attention_mask, memory_vectors=None, plan: Optional[dict] = None):
        if plan is not None and plan.get("packed"):
            return self._packed_hidden_states(input_ids, memory_vectors, plan)
        if self.adapter_scope == "recall":
            return self._activated_hidden_states(input_ids, attention_mask, memory_vectors, plan)
        emb = self.embed(input_ids, memory_vectors, None if plan is None else plan["pad_index"])
        if plan is not None and plan.get("right_padded"):
            # every row is its tokens then padding: causal attention alone keeps the padding out of
            # every real position, so no mask is needed. Without one the attention runs its causal
            # kernel, and transformers does not test the mask on the device (a host sync)
            attention_mask = None
        return backbone(self.lm)(inputs_embeds=emb, attention_mask=attention_mask).last_hidden_state

    def _packed_hidden_states(self, input_ids, memory_vectors, plan: dict):
        """(1, T, d) final hidden states of a packed batch (``DecodingCollator(packed=True)``):
        one row, positions restarting per sample, attention within each sample only."""
        from recall.packing import packed_attention

        if self.adapter_scope == "recall":
            raise ValueError("a packed batch needs adapter_scope 'all' (the activated adapter runs two padded passes)")
        emb = self.embed(input_ids, memory_vectors, plan["pad_index"])
        cu, longest = plan["cu_seq_lens"], plan["max_length"]
        with packed_attention(self.lm):
            return backbone(self.lm)(inputs_embeds=emb, position_ids=plan["position_ids"], use_cache=False,
                                     cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                                     max_length_k=longest).last_hidden_state

    def _activated_hidden_states(self, input_ids, attention_mask, memory_vectors=None, plan: Optional[dict] = None):
        """Final hidden states, (B, T, d), with the activated adapter acting from each row's
        first ``<recall>`` on (rows right-padded).

        Two passes: the context (everything before ``<recall>``; a row without one is all
        context) runs through the base model without gradient and leaves its KV cache; the
        rest (``<recall>``, the injected memory, its text, the continuation) runs with the
        adapter, attending to that cache, at its true positions. The two are laid back into
        one (B, T, d) tensor, so labels and losses index it as in the single-pass model; the
        gradient reaches the adapter through the second pass only."""
        batch, width = input_ids.shape
        device = input_ids.device
        is_recall = input_ids == self.recall_id
        lengths = attention_mask.long().sum(1)
        start = torch.where(is_recall.any(1), is_recall.int().argmax(1), lengths)  # context length per row
        steps = torch.arange(width, device=device)
        ctx_width = plan["ctx_width"] if plan is not None else max(int(start.max()), 1)  # int(): a host sync
        ctx_mask = (steps[None, :ctx_width] < start[:, None]).long()
        if self.context_cache is not None and self.context_cache.usable(input_ids, start):
            # the context never sees the adapter and holds no trainable token: its KV cache and
            # states are fixed while training, so each distinct context runs once (host syncs:
            # the cache is keyed by token ids; off with context_cache_mb 0)
            kv, ctx_mask, _, ctx_hidden = self.context_cache.batch(input_ids, attention_mask, start,
                                                                   self._base_context, with_hidden=True)
            ctx_width = ctx_mask.shape[1]
        else:
            kv, ctx_hidden = self._base_context(input_ids[:, :ctx_width], ctx_mask)
        tail_len = lengths - start
        tail_width = plan["tail_width"] if plan is not None else max(int(tail_len.max()), 1)
        offsets = steps[None, :tail_width]
        tail_mask = (offsets < tail_len[:, None]).long()
        gathered = input_ids.gather(1, (start[:, None] + offsets).clamp(max=width - 1))
        tail_ids = torch.where(tail_mask.bool(), gathered, torch.zeros_like(gathered))
        # every <|memory_pad|> follows a <recall>, so it lies in the tail
        emb = self.embed(tail_ids, memory_vectors, None if plan is None else plan["tail_pad_index"])
        with adapter_active(self.lm, [tail_width] * batch):
            tail = backbone(self.lm)(inputs_embeds=emb, attention_mask=torch.cat([ctx_mask, tail_mask], dim=1),
                                     position_ids=start[:, None] + offsets, cache=kv,
                                     use_cache=True).last_hidden_state
        d = tail.shape[-1]
        head = F.pad(ctx_hidden, (0, 0, 0, width - ctx_width)) if width > ctx_width else ctx_hidden[:, :width]
        index = (steps[None] - start[:, None]).clamp(0, tail_width - 1)
        rest = tail.gather(1, index[..., None].expand(batch, width, d))
        return torch.where((steps[None] < start[:, None])[..., None], head.to(rest.dtype), rest)

    def _base_context(self, input_ids, attention_mask):
        """(KV cache, final states) of the base model over contexts (no adapter, no gradient)."""
        ctx = base_context_pass(self.lm, inputs_embeds=self.token_rows(input_ids), attention_mask=attention_mask)
        return ctx.cache, ctx.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits with the new tokens' trained fp32 output rows."""
        head = self.lm.get_output_embeddings()
        out = head(hidden).float()
        # (..., n_new); via the module's forward so ZeRO-3 gathers the delta
        extra = self.token_rows(None, output_hidden=hidden) if self.tied else hidden.float() @ self.head_delta.float().T
        # in place: ``out`` is a fresh tensor autograd does not keep, and a copy of (labelled
        # positions, vocab) fp32 logits is the largest memory traffic of a step-2 step
        return out.index_add_(-1, self.token_rows.token_ids, extra.float())  # bf16 under autocast

    def forward(self, input_ids, attention_mask, labels, memory_vectors=None, recall_targets=None,
                recall_anchors=None, kd_indices=None, kd_logprobs=None, kd_mask=None,
                plan: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        """``loss``: the ``loss_weights``-weighted sum of the parts, which are returned too
        (detached, unweighted): ``lm`` next-token CE on labels; ``recall`` InfoNCE of the
        first ``<recall>`` state against the bank (rows with ``recall_targets >= 0``);
        ``preserve`` 1 - cos to the step-1 query (rows with a non-zero anchor); ``kd``
        KL(base || model) on positions with the base model's top-k log-probs.

        ``plan``: the batch's positions, found by the collator on the host (``index_plan``).
        Without it they are found here with ``nonzero`` and friends, each a host sync that
        stalls the GPU queue; the values are the same either way.

        One loss tensor, whatever the batch holds: ZeRO-3 fetches a module's parameters for
        backward from hooks on its outputs, so every rank's forward must return the same
        tensors with gradients (a batch without SFT answers has no ``kd`` part)."""
        if plan is None:
            plan = index_plan(input_ids.cpu(), labels.cpu(), attention_mask.cpu(), self.recall_id, self.pad_id,
                              None if recall_targets is None else recall_targets.cpu(),
                              None if recall_anchors is None else recall_anchors.cpu(),
                              None if kd_mask is None else kd_mask.cpu())
            plan = {k: v.to(input_ids.device) if torch.is_tensor(v) else v for k, v in plan.items()}
        hidden = self.hidden_states(input_ids, attention_mask, memory_vectors, plan)
        width = hidden.shape[1]
        # labelled positions as flat row indices: index_select's backward is a scatter-add, where
        # a boolean mask's is a sorting index_put (10 ms a step for a 1B model on an H100)
        at = plan["label_index"]  # b * width + t for each t whose next token is labelled (row-major)
        targets = labels.flatten().index_select(0, at + 1)
        if self.head_on_all_positions:  # same values, computed the plain causal-LM way
            logits = self.logits(hidden[:, :-1]).flatten(0, 1).index_select(0, at - at // width)
        else:
            logits = self.logits(hidden.flatten(0, 1).index_select(0, at))
        log_probs = torch.log_softmax(logits, dim=-1)  # once, for the CE and the KD term
        parts = {"lm": F.nll_loss(log_probs, targets)}
        sel = plan.get("kd_select")
        if kd_mask is not None and sel is not None and sel.numel():
            logp = log_probs.index_select(0, sel)
            where = at.index_select(0, sel) + 1  # the next token's row in the (B * width) layout
            teacher_logp = kd_logprobs.flatten(0, 1).index_select(0, where)
            teacher_logp = teacher_logp - torch.logsumexp(teacher_logp, dim=-1, keepdim=True)  # renormalise top-k
            student = logp.gather(-1, kd_indices.flatten(0, 1).index_select(0, where))
            parts["kd"] = (teacher_logp.exp() * (teacher_logp - student)).sum(-1).mean()
        flat = hidden.flatten(0, 1)
        rows = plan["recall_rows"]
        if recall_targets is not None and self.memory_bank is not None and rows.numel():
            query = F.normalize(flat.index_select(0, plan["recall_index"]).float(), dim=-1)
            scores = query @ self.memory_bank.to(query.device, query.dtype).T * self.recall_scale
            parts["recall"] = F.cross_entropy(scores, recall_targets.index_select(0, rows))
        rows = plan["preserve_rows"]
        if recall_anchors is not None and rows.numel():
            query = F.normalize(flat.index_select(0, plan["preserve_index"]).float(), dim=-1)
            anchors = F.normalize(recall_anchors.index_select(0, rows), dim=-1)
            parts["preserve"] = (1 - (query * anchors).sum(-1)).mean()
        loss = sum(self.loss_weights[k] * v for k, v in parts.items() if self.loss_weights.get(k, 0.0) > 0)
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}

    @torch.no_grad()
    def recall_states(self, contexts: Sequence[Sequence[int]], batch_size: int = 32) -> torch.Tensor:
        """(N, d) fp32 final states at a ``<recall>`` placed after each context (token ids), by
        the forward pass training runs, in its precision (call it under the trainer's autocast).
        Before training these are the preserve term's targets: the state step 1 left for each
        context a sample can have, laid out exactly as the samples lay it out. With an activated
        adapter each context's base pass fills the context cache, so training's first epoch
        finds it there. Each distinct context runs once, in batches of similar length."""
        was_training = self.training
        self.eval()  # no injection noise (there is no pad here either way)
        device = self.token_rows.delta.device

        def encode(chunk: List[tuple]) -> torch.Tensor:
            width = max(len(c) for c in chunk) + 1
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for b, c in enumerate(chunk):
                ids[b, :len(c) + 1] = torch.tensor([*c, self.recall_id])
                mask[b, :len(c) + 1] = 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = self.hidden_states(ids, mask)
            return hidden[torch.arange(len(chunk), device=device), mask.sum(1) - 1].float().cpu()

        try:
            return encode_by_length([tuple(c) for c in contexts], encode, batch_size)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def merged_lm(self):
        """The plain causal LM with LoRA and the new-token rows merged in (for publishing);
        with an activated adapter, the PEFT model with the rows merged into its base (the
        adapter cannot be merged: it acts from ``<recall>`` on only). The wrapper is unusable
        afterwards."""
        from recall.token_rows import uninstall_token_rows

        if self.adapter_scope == "recall":
            lm = base = self.lm.get_base_model()  # the rows go into the base; the PEFT model is returned
        else:
            lm = base = self.lm.merge_and_unload() if hasattr(self.lm, "merge_and_unload") else self.lm
        if self.head_delta is not None:
            head = base.get_output_embeddings().weight
            ids = self.token_rows.token_ids
            head[ids] = (head[ids].float() + self.head_delta.to(head.device)).to(head.dtype)
        uninstall_token_rows(base, merge=True)
        return self.lm if self.adapter_scope == "recall" else lm


def build_decoder_model(lm, token_ids: Dict[str, int], args: MemoryDecodingArguments, memory_dim: int,
                        memory_bank: Optional[torch.Tensor] = None,
                        adapter_state: Optional[Dict[str, torch.Tensor]] = None) -> MemoryDecoderModel:
    """``adapter_state``: LoRA weights to start from (step 1's activated adapter, keys as in
    ``RecallQueryModel``'s state: ``lm.base_model.model...lora_A.default.weight``)."""
    from memory.token_manager import RECALL_TOKEN
    from peft import get_peft_model

    targets = resolve_targets(lm, args.lora_target_modules, "decode")
    lora = lora_config(targets, args.lora_r, args.lora_alpha, args.lora_dropout, args.adapter_scope,
                       token_ids[RECALL_TOKEN])
    peft_lm = get_peft_model(lm, lora)
    if adapter_state:
        load_lora_state(peft_lm, {k.removeprefix("lm."): v for k, v in adapter_state.items()}, "step 1's adapter")
    if args.adapter_scope == "recall":
        use_fast_forward(peft_lm)  # the lean aLoRA forward: plain LoRA on the tail passes
    if args.compile_layers:
        from recall.compilation import compile_layers

        compile_layers(peft_lm, args.deepspeed)
    model = MemoryDecoderModel(peft_lm, token_ids, memory_dim, args.projector_hidden,
                               args.noise_std, memory_bank, args.recall_temperature)
    model.loss_weights = {"lm": 1.0, "recall": args.recall_loss_weight, "preserve": args.preserve_weight,
                          "kd": args.kd_weight}
    model.head_on_all_positions = args.head_on_all_positions
    model.adapter_scope = args.adapter_scope
    from transformers.integrations import is_deepspeed_zero3_enabled

    if args.adapter_scope == "recall" and args.context_cache_mb > 0 and not is_deepspeed_zero3_enabled():
        from recall.text_embedding_train import ContextKVCache

        model.context_cache = ContextKVCache(lm.config, args.context_cache_mb, list(token_ids.values()))
    return model


# ------------------------------------------------------------------ samples
@dataclasses.dataclass
class Segment:
    ids: List[int]
    labelled: bool


def assemble(segments: Sequence[Segment], max_length: int, memory_row: int = -1, recall_target: int = -1,
             kind: str = "", anchor: int = -1, kd: int = -1) -> dict:
    """Concatenate token segments into one sample; over ``max_length``, drop tokens from
    the *left* of the first segment (the context) so the recall point and the memory
    survive."""
    total = sum(len(s.ids) for s in segments)
    overflow = max(0, total - max_length)
    input_ids: List[int] = []
    labels: List[int] = []
    for i, seg in enumerate(segments):
        ids = seg.ids
        if overflow and i == 0:
            cut = min(overflow, len(ids))
            ids, overflow = ids[cut:], overflow - cut
        input_ids += ids
        labels += ids if seg.labelled else [IGNORE] * len(ids)
    if overflow:  # the context alone could not absorb it: cut the end instead
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels, "memory_row": memory_row, "recall_target": recall_target,
            "kind": kind, "anchor": anchor, "kd": kd}


def index_plan(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor, recall_id: int,
               pad_id: int, recall_targets: Optional[torch.Tensor] = None,
               recall_anchors: Optional[torch.Tensor] = None, kd_mask: Optional[torch.Tensor] = None) -> dict:
    """Every position ``MemoryDecoderModel.forward`` indexes, found on the host (CPU tensors in,
    as the collator has them), so the forward on a GPU needs no ``nonzero``, ``any()`` or
    ``int()`` of a device tensor, each of which waits for the GPU to drain its queue. Flat
    positions are ``row * width + column`` of the (B, width) batch.

    - ``label_index``: the positions whose next token is labelled (row-major), the LM head's rows;
    - ``kd_select``: which of those (indices into ``label_index``) carry a KD target;
    - ``recall_rows`` / ``recall_index``: rows with a recall target, and their first ``<recall>``;
    - ``preserve_rows`` / ``preserve_index``: rows with ``<recall>`` and a non-zero anchor;
    - ``pad_index``: the ``<|memory_pad|>`` positions (row-major: the memory vectors' order);
    - ``right_padded``: every row is its tokens, then padding (the collator's layout), so the
      single pass needs no attention mask;
    - for an activated adapter: ``ctx_width`` and ``tail_width`` (ints: the two passes' widths)
      and ``tail_pad_index``, the pads' flat positions in the tail pass's (B, tail_width) layout."""
    batch, width = input_ids.shape
    at_b, at_t = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    is_recall = input_ids == recall_id
    has_recall = is_recall.any(1)
    first = is_recall.int().argmax(1)
    rows_all = torch.arange(batch)
    plan = {"label_index": at_b * width + at_t}
    if kd_mask is not None:
        plan["kd_select"] = kd_mask[:, 1:][at_b, at_t].nonzero(as_tuple=True)[0]
    rows = rows_all[recall_targets >= 0] if recall_targets is not None else rows_all[:0]
    plan.update(recall_rows=rows, recall_index=rows * width + first[rows])
    rows = rows_all[has_recall & (recall_anchors.abs().sum(-1) > 0)] if recall_anchors is not None else rows_all[:0]
    plan.update(preserve_rows=rows, preserve_index=rows * width + first[rows])
    pad_rows, pad_cols = (input_ids == pad_id).nonzero(as_tuple=True)
    plan["pad_index"] = pad_rows * width + pad_cols
    lengths = attention_mask.long().sum(1)
    plan["right_padded"] = bool(torch.equal(attention_mask.long(), (torch.arange(width)[None] < lengths[:, None]).long()))
    start = torch.where(has_recall, first, lengths)
    plan["ctx_width"] = max(int(start.max()), 1) if batch else 1
    plan["tail_width"] = max(int((lengths - start).max()), 1) if batch else 1
    plan["tail_pad_index"] = pad_rows * plan["tail_width"] + (pad_cols - start[pad_rows])
    return plan


def packed_index_plan(features: List[dict], recall_id: int, pad_id: int, labels: torch.Tensor,
                      kd_mask: Optional[torch.Tensor] = None, recall_anchors: Optional[torch.Tensor] = None) -> dict:
    """``index_plan`` for a packed batch: ``features``' samples end to end in one row of
    ``T = sum(lengths)`` tokens (``labels`` (1, T) as the collator packed them). Flat positions
    are positions in that row; ``recall_rows`` / ``preserve_rows`` index samples (the rows of
    ``recall_targets`` and ``recall_anchors``). Adds what the packed forward needs:
    ``position_ids`` (1, T), ``cu_seq_lens`` (N + 1,) int32, ``max_length`` (an int: the
    longest sample, rounded up to a multiple of 64 so a compiled block sees few values)."""
    lengths = torch.tensor([len(f["input_ids"]) for f in features])
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    label_index = (labels[0, 1:] != IGNORE).nonzero(as_tuple=True)[0]
    plan = {"label_index": label_index, "packed": True, "right_padded": False,
            "position_ids": torch.cat([torch.arange(n) for n in lengths.tolist()])[None],
            "cu_seq_lens": offsets.to(torch.int32),
            "max_length": -(-int(lengths.max()) // 64) * 64 if len(features) else 64}
    if kd_mask is not None:
        plan["kd_select"] = kd_mask[0, 1:].index_select(0, label_index).nonzero(as_tuple=True)[0]
    first = torch.tensor([f["input_ids"].index(recall_id) if recall_id in f["input_ids"] else 0 for f in features])
    has = torch.tensor([recall_id in f["input_ids"] for f in features], dtype=torch.bool)
    samples = torch.arange(len(features))
    rows = samples[torch.tensor([f["recall_target"] >= 0 for f in features], dtype=torch.bool)]
    plan.update(recall_rows=rows, recall_index=offsets[rows] + first[rows])
    rows = samples[has & (recall_anchors.abs().sum(-1) > 0)] if recall_anchors is not None else samples[:0]
    plan.update(preserve_rows=rows, preserve_index=offsets[rows] + first[rows])
    plan["pad_index"] = torch.tensor([int(offsets[b]) + t for b, f in enumerate(features)
                                      for t, tok in enumerate(f["input_ids"]) if tok == pad_id], dtype=torch.long)
    return plan


class DecodingCollator:
    """Right-pads samples to the longest in the batch and stacks one memory vector per
    ``<|memory_pad|>`` (in batch order) from ``memory_vectors`` (M, d).

    ``packed``: lay the samples end to end in one row instead, with no padding (a GPU lever:
    see ``recall.packing``); each sample's first label is dropped, as a padded row never
    predicts its first token either."""

    def __init__(self, pad_token_id: int, memory_vectors: torch.Tensor, memory_pad_id: int,
                 pad_to: Optional[int] = None, anchors: Optional[torch.Tensor] = None, kd: Optional[list] = None,
                 pad_to_multiple_of: int = 1, recall_id: Optional[int] = None, packed: bool = False):
        """``anchors``: (A, d) step-1 queries indexed by a sample's ``anchor``; ``kd``: per
        SFT example, (indices, log-probs) of shape (answer length, k), for a sample's ``kd``
        index (its answer is the sample's tail). ``pad_to_multiple_of``: round the batch width
        up (a few distinct shapes let cuDNN attention reuse its plans on GPU). ``recall_id``:
        add the batch's ``index_plan`` (the trainer passes it; a packed batch needs it)."""
        if packed and recall_id is None:
            raise ValueError("a packed DecodingCollator needs recall_id: the packed forward reads the batch's plan")
        self.pad, self.vectors, self.memory_pad_id, self.pad_to = pad_token_id, memory_vectors, memory_pad_id, pad_to
        self.anchors, self.kd, self.multiple = anchors, kd, max(1, pad_to_multiple_of)
        self.recall_id, self.packed = recall_id, packed

    def padded(self) -> "DecodingCollator":
        """This collator with ``packed`` off (the decode check reads padded rows)."""
        if not self.packed:
            return self
        other = copy.copy(self)
        other.packed = False
        return other

    def __call__(self, features: List[dict]) -> Dict[str, torch.Tensor]:
        if self.packed:
            return self._pack(features)
        width = self.pad_to or max(len(f["input_ids"]) for f in features)
        width = -(-width // self.multiple) * self.multiple
        ids = torch.tensor([f["input_ids"] + [self.pad] * (width - len(f["input_ids"])) for f in features])
        labels = torch.tensor([f["labels"] + [IGNORE] * (width - len(f["labels"])) for f in features])
        mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                 "recall_targets": torch.tensor([f["recall_target"] for f in features])}
        self._extras(features, batch)
        self._kd_targets(features, batch, width, [(b, len(f["input_ids"])) for b, f in enumerate(features)])
        if self.recall_id is not None:
            batch["plan"] = index_plan(ids, labels, mask, self.recall_id, self.memory_pad_id, batch["recall_targets"],
                                       batch.get("recall_anchors"), batch.get("kd_mask"))
        return batch

    def _extras(self, features: List[dict], batch: dict) -> None:
        """The batch's memory vectors (one per ``<|memory_pad|>``, in order) and anchors."""
        rows = []
        for f in features:
            n = f["input_ids"].count(self.memory_pad_id)
            if n and f["memory_row"] < 0:
                raise ValueError("a sample has <|memory_pad|> but no memory_row")
            rows += [f["memory_row"]] * n
        if rows:
            batch["memory_vectors"] = self.vectors[torch.tensor(rows)]
        if self.anchors is not None:
            batch["recall_anchors"] = torch.stack([self.anchors[f["anchor"]] if f.get("anchor", -1) >= 0
                                                   else self.anchors.new_zeros(self.anchors.shape[1])
                                                   for f in features])

    def _kd_targets(self, features: List[dict], batch: dict, width: int, ends: List[tuple]) -> None:
        """The KD targets (base top-k indices and log-probs, and their mask) of the samples with
        a ``kd`` index, on their answer: the tail of sample b, which ends at ``ends[b] = (row,
        end)`` of a batch of rows of ``width``."""
        if self.kd is None or not any(f.get("kd", -1) >= 0 for f in features):
            return
        rows = 1 + max(row for row, _ in ends)
        k = self.kd[0][0].shape[1]
        idx = torch.zeros(rows, width, k, dtype=torch.long)
        logp = torch.zeros(rows, width, k)
        kd_mask = torch.zeros(rows, width, dtype=torch.bool)
        for f, (row, end) in zip(features, ends):
            if f.get("kd", -1) < 0:
                continue
            i, lp = self.kd[f["kd"]]
            idx[row, end - len(i):end], logp[row, end - len(i):end] = i, lp
            kd_mask[row, end - len(i):end] = True
        batch.update(kd_indices=idx, kd_logprobs=logp, kd_mask=kd_mask)

    def _pack(self, features: List[dict]) -> Dict[str, torch.Tensor]:
        ids: List[int] = []
        labels: List[int] = []
        for f in features:
            ids += f["input_ids"]
            labels += [IGNORE] + list(f["labels"][1:])  # the previous sample's last token predicts nothing
        total = len(ids)
        batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, total, dtype=torch.long),
                 "labels": torch.tensor([labels]),
                 "recall_targets": torch.tensor([f["recall_target"] for f in features])}
        self._extras(features, batch)
        ends = torch.tensor([len(f["input_ids"]) for f in features]).cumsum(0).tolist()
        self._kd_targets(features, batch, total, [(0, end) for end in ends])
        batch["plan"] = packed_index_plan(features, self.recall_id, self.memory_pad_id, batch["labels"],
                                          batch.get("kd_mask"), batch.get("recall_anchors"))
        return batch


class ResampledDataset(torch.utils.data.Dataset):
    """A fixed-size epoch whose samples are redrawn each epoch by ``sampler(epoch, rng)``.

    ``group``: the per-device batch size, to lay each epoch out in length-grouped batches
    (0: off). Within windows of ``group * GROUP_WINDOW`` samples, samples are sorted by length
    and cut into batches, and the batches are shuffled; the trainer then reads the dataset in
    order, so a batch pads to the longest of similar lengths. A last partial batch stays last
    (so every batch boundary stays aligned; under data parallelism each rank takes whole batches)."""

    GROUP_WINDOW = 16

    def __init__(self, sampler, seed: int = 0, group: int = 0):
        self.sampler, self.seed, self.group = sampler, seed, group
        self.items = self._arrange(sampler(0, random.Random(seed)), random.Random(seed))
        self.size = len(self.items)

    def _arrange(self, items: List[dict], rng: random.Random) -> List[dict]:
        if self.group <= 1:
            return items
        window = self.group * self.GROUP_WINDOW
        batches = []
        for start in range(0, len(items), window):
            chunk = sorted(items[start:start + window], key=lambda x: len(x["input_ids"]))
            batches += [chunk[i:i + self.group] for i in range(0, len(chunk), self.group)]
        tail = [b for b in batches if len(b) < self.group]
        full = [b for b in batches if len(b) == self.group]
        rng.shuffle(full)
        return [x for b in full + tail for x in b]

    def resample(self, epoch: int) -> None:
        rng = random.Random(self.seed + 1000 * epoch)
        items = self._arrange(self.sampler(epoch, rng), rng)
        if len(items) != self.size:
            raise RuntimeError(f"resampled epoch has {len(items)} samples, expected {self.size}")
        self.items = items

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class _ResampleEachEpoch(TrainerCallback):
    def __init__(self, dataset: ResampledDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = int(math.floor(state.epoch or 0))
        if epoch > 0:
            self.dataset.resample(epoch)


class _DecodeCheckEachEpoch(TrainerCallback):
    """At each epoch's end: ``trainer.decode_check()``, logged as ``decode_exact_match``;
    stops training once it reaches ``args.stop_at_exact_match`` (when > 0). It runs before
    the epoch's checkpoint is saved, so a stopped run's last checkpoint is its final state."""

    def __init__(self, trainer: "EnhancedTextMemoryTrainer"):
        self.trainer = trainer

    def on_epoch_end(self, args, state, control, **kwargs):
        rate = self.trainer.decode_check()
        self.trainer.log({"decode_exact_match": round(rate, 4)})
        stop = 0 < args.stop_at_exact_match <= rate
        logger.info("step 2, epoch %.0f: %.3f of the memories decode exactly (teacher-forced)%s", state.epoch or 0,
                    rate, "; stopping" if stop else "")
        if stop:
            control.should_training_stop = True
        return control


class EnhancedTextMemoryTrainer(SmallStateTrainerMixin, Trainer):
    """``Trainer`` for step 2. ``memory_vectors``: (M, d) DB vectors, indexed by each
    sample's ``memory_row``. A ``ResampledDataset`` is redrawn at every epoch.

    ``check_samples``: one sample per memory (the memory after a fixed context, as
    ``decode_exact_match`` decodes it). When given, ``decode_check`` runs at every epoch's
    end (see ``_DecodeCheckEachEpoch``)."""

    STATE_FILE = DECODER_STATE  # only the small trainable state is saved (SmallStateTrainerMixin)

    def __init__(self, model: MemoryDecoderModel, args: MemoryDecodingArguments, memory_vectors: torch.Tensor,
                 tokenizer, train_dataset, anchors: Optional[torch.Tensor] = None, kd: Optional[list] = None,
                 check_samples: Optional[List[dict]] = None, **kwargs):
        kwargs.setdefault("data_collator", DecodingCollator(tokenizer.pad_token_id, memory_vectors.float(),
                                                            model.pad_id, anchors=anchors, kd=kd,
                                                            pad_to_multiple_of=args.pad_to_multiple_of,
                                                            recall_id=model.recall_id, packed=args.packing))
        prepare_deepspeed_args(args)
        super().__init__(model=model, args=args, processing_class=tokenizer, train_dataset=train_dataset, **kwargs)
        if isinstance(train_dataset, ResampledDataset):
            self.add_callback(_ResampleEachEpoch(train_dataset))
        self.check_samples = list(check_samples or [])
        if self.check_samples:
            self.add_callback(_DecodeCheckEachEpoch(self))
        self._parts: Dict[str, List[float]] = {}

    @torch.no_grad()
    def decode_check(self, batch_size: int = 32) -> float:
        """Share of ``check_samples`` whose every labelled token after the ``<|memory_pad|>``
        (the memory text and ``</recall>``) is the model's argmax under teacher forcing.

        That is exactly "greedy decoding reproduces the text": by induction over positions, greedy
        decoding follows the text for as long as each next token is the argmax given the text so
        far. So one batched forward pass stands in for token-by-token generation. The published
        ``decode_exact_match`` decodes for real (merged weights, KV cache) and normalises
        whitespace, so it can differ by numerics, and otherwise only upwards.

        Every rank runs it on the same samples (ZeRO-3 gathers are collective), and the count is
        the minimum over ranks, so all ranks take the same decision."""
        model = self.model
        was_training = model.training
        model.eval()  # no injection noise
        exact = 0
        padded = getattr(self.data_collator, "padded", None)
        collate = padded() if padded is not None else self.data_collator  # the check reads padded rows
        try:
            for start in range(0, len(self.check_samples), batch_size):
                batch = self._prepare_inputs(collate(self.check_samples[start:start + batch_size]))
                ids, labels = batch["input_ids"], batch["labels"]
                with self.compute_loss_context_manager():
                    hidden = model.hidden_states(ids, batch["attention_mask"], batch.get("memory_vectors"))
                    targets = labels[:, 1:]
                    after_pad = torch.arange(targets.shape[1], device=ids.device)[None] >= \
                        (ids == model.pad_id).int().argmax(1)[:, None]
                    at_b, at_t = ((targets != IGNORE) & after_pad).nonzero(as_tuple=True)
                    logits = model.logits(hidden[at_b, at_t])
                wrong = (logits.argmax(-1) != targets[at_b, at_t]).long()
                errors = torch.zeros(len(ids), dtype=torch.long, device=ids.device).index_add_(0, at_b, wrong)
                exact += int((errors == 0).sum())
        finally:
            model.train(was_training)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            count = torch.tensor([exact], device=self.args.device)
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
            exact = int(count.item())
        return exact / max(len(self.check_samples), 1)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, ResampledDataset) and dataset.group > 1:
            return torch.utils.data.SequentialSampler(dataset)  # the epoch is already laid out in batches
        return super()._get_train_sampler(train_dataset)

    def train(self, *args, **kwargs):
        from recall.cpu_bf16 import bf16_cpu_training

        with bf16_cpu_training(self.model, self.args, self.args.device):  # CPU bf16 autocast: recall/cpu_bf16.py
            return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        parts = model(**inputs)
        loss = parts.pop("loss")
        for k, v in parts.items():  # kept on the device: .item() here would sync every step
            self._parts.setdefault(f"{k}_loss", []).append(v)
        return (loss, None) if return_outputs else loss

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        for name, values in self._parts.items():
            if values and "loss" in logs:
                logs[name] = round(torch.stack(values).float().mean().item(), 4)
                values.clear()
        super().log(logs, *args, **kwargs)
