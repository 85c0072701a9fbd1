"""Training throughput of both trainers at a realistic model size: tokens/s, MFU, peak memory.

    python -m bench.gpu_train --size 1b --step decode --steps 200 --batch 32
    deepspeed --num_gpus 1 --module bench.gpu_train --size 1b --step decode --deepspeed ds_configs/zero2.json
    python -m bench.gpu_train --size tiny --steps 6 --batch 4 --device cpu     # a smoke run on CPU
    bash bench/gpu_check.sh                                                    # all of it, on a lent GPU

The model is a **random-initialised** Llama of the named size (nothing is downloaded; the
tokenizer is the default model's, or ``--tokenizer DIR``). The data are synthetic texts of the
shapes the pipeline trains on: step 1 (``RecallMemoryTrainer``) on ``context + <recall>``
queries against a bank of memory vectors, step 2 (``EnhancedTextMemoryTrainer``) on the three
sample kinds (memory, memory inside an SFT answer, pure SFT) with the KD and preserve terms on.
Both run through the real trainers, so the figure is what a user's run gets.

**FLOPs counted** (per real, non-pad token; pad tokens are not useful work):
forward ``2 N`` (N = transformer matmul weights) + causal attention ``2 L d S`` + the LM head
``2 V d`` only where step 2 has a label; backward = 2x forward for the trainable LoRA/row
weights and 1x for the frozen base (activation gradients only). MFU = those FLOPs / time /
the card's nominal dense bf16 peak; the same run also measures a large bf16 matmul and
reports the fraction of that. ``mfu_6n`` is the usual 6N-per-token figure for comparison
(it counts weight gradients the frozen base does not need, so it reads 1.5x higher).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from typing import Optional

import torch

SIZES = {  # Llama-style configs; vocab is the tokenizer's (49k for SmolLM2's)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),  # SmolLM2-135M's shape
    "0.5b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=4),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),  # Llama-3.2-1B's shape: 1.07B with a 49k vocab
}
NOMINAL_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}

WORDS = ("the user likes hiking near the lake every weekend and works as a nurse in a small town hospital "
         "her brother lives in Lisbon with two cats called Pixel and Nori she is learning Portuguese and plays "
         "cello in a community orchestra on Thursdays they moved house in March after the landlord sold the flat "
         "favourite food is spicy ramen allergic to peanuts drives an old blue Volvo reads science fiction").split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def synthetic_data(n_memories: int, seed: int = 0):
    """Memories (~25 words), 3 contexts each (~60-120 words), and SFT pairs (~40 + ~60 words)."""
    from memory.sft_data import SFTExample

    rng = random.Random(seed)
    memories = [f"Fact {i}: " + _text(rng, rng.randint(15, 30)) for i in range(n_memories)]
    contexts = [[_text(rng, rng.randint(60, 120)) for _ in range(3)] for _ in range(n_memories)]
    sft = [SFTExample(prompt=_text(rng, rng.randint(20, 60)) + "?", answer=_text(rng, rng.randint(40, 80)))
           for _ in range(max(64, n_memories))]
    return memories, contexts, sft


def random_model(size: str, tokenizer, dtype, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    # no pad_token_id: the embedding would make it its padding_idx and initialise its row to zero.
    # The pad is <|im_end|> (the eos), which starts some left-truncated samples; a zero input at
    # position 0 stays exactly zero through every layer (it attends only to itself), and each
    # RMSNorm's backward at zero multiplies the gradient by 1/sqrt(eps): 16 layers overflowed to
    # inf (NaN gradients from step 9 on in every 1B run before 2026-11-28). A trained model has
    # no such row; the collators take the pad id from the tokenizer.
    cfg = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, pad_token_id=None,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                      max_position_embeddings=2048, **SIZES[size])
    with torch.device(device):  # initialised where it will train: seconds on a GPU for 1B
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def matmul_peak(device, dtype=torch.bfloat16, n: int = 8192, reps: int = 10, trials: int = 3) -> float:
    """Measured TFLOP/s of an n^3 matmul (after warm-up), the ceiling this run can reach: the
    best of ``trials`` timings, so a momentarily busy machine does not lower the ceiling (and
    inflate MFU). On a CPU, n is 2048 (1024 where that is slow) and each trial lasts about half a
    second."""
    warmup = 3
    if device.type == "cpu":
        # CPUs differ 100x in bf16 (1 GFLOP/s without bf16 units, ~0.8 TFLOP/s with AMX/AVX512-BF16
        # on 2 cores): time one 2048^3 product (one 1024^3 where that is slow), then repeat it for
        # about half a second per trial; a few-millisecond trial read the peak 25% low
        for n in (2048, 1024):
            a = torch.randn(n, n, dtype=dtype)
            t = time.perf_counter()
            a @ a
            once = time.perf_counter() - t
            if once <= 1.0:
                break
        reps, warmup, trials = max(1, min(50, int(0.5 / max(once, 1e-6)))), 1, (5 if once < 0.5 else 2)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        a @ b
    best = 0.0
    for _ in range(trials):
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12)
    return best


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class CountingCollator:
    """Wraps a collator; records real tokens, padded tokens, labelled tokens and the
    attention work (sum of squared lengths) of every batch it makes.

    With ``attach`` (data-loader worker processes, whose memory the trainer's process does not
    see) the record travels in the batch instead, as ``COUNTS_KEY``; ``count_steps`` takes it
    out before the model sees the batch."""

    COUNTS_KEY = "bench_counts"
    FIELDS = ("tokens", "padded", "labelled", "sq", "tail_tokens")

    def __init__(self, inner, recall_id: Optional[int] = None, query: bool = False, attach: bool = False):
        self.inner, self.batches, self.recall_id, self.query = inner, [], recall_id, query
        self.attach, self.pending = attach, []

    def __call__(self, features):
        batch = self.inner(features)
        record = self.count(batch)
        if self.attach:
            batch[self.COUNTS_KEY] = torch.tensor([record.get(k, -1) for k in self.FIELDS], dtype=torch.float64)
        else:
            self.batches.append(record)
        return batch

    def count_steps(self, trainer) -> None:
        """Take the attached records out of each batch before ``trainer`` trains on it; they
        stay device tensors until ``collect`` (no synchronisation per step)."""
        inner = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            self.pending.append(inputs.pop(self.COUNTS_KEY))
            return inner(model, inputs, *args, **kwargs)

        trainer.training_step = training_step

    def collect(self) -> None:
        for counts in self.pending:
            values = [int(v) for v in counts.tolist()]
            self.batches.append({k: v for k, v in zip(self.FIELDS, values) if v >= 0})
        self.pending = []

    def count(self, batch) -> dict:
        plan = batch.get("plan") or {}
        if plan.get("packed"):  # one row: the samples' lengths are in the plan
            cu = plan["cu_seq_lens"].long()
            lengths = cu[1:] - cu[:-1]
        else:
            lengths = batch["attention_mask"].sum(1)
        labels = batch.get("labels")
        record = {"tokens": int(lengths.sum()), "padded": int(batch["attention_mask"].numel()),
                  "labelled": int((labels != -100).sum()) if labels is not None else 0,
                  "sq": int((lengths.double() ** 2).sum())}
        if self.query:  # step 1, activated: the adapter and the backward pass cover the <recall> token alone
            record["tail_tokens"] = int((batch["input_ids"] == self.recall_id).sum())
        elif self.recall_id is not None:  # tokens from the first <recall> on: what an activated adapter trains
            ids = batch["input_ids"]
            has = (ids == self.recall_id).any(1)
            start = torch.where(has, (ids == self.recall_id).int().argmax(1), lengths)
            record["tail_tokens"] = int((lengths - start).sum())
        return record


def _count_context_passes(model) -> Optional[list]:
    """With the activated adapter, record the real tokens of every context pass the model
    runs (a device tensor each, read after timing): with a context cache, only misses and
    batches the cache cannot serve run one, and only those are counted as FLOPs."""
    for name in ("_base_context", "_context_pass"):  # step 2's, step 1's
        inner = getattr(model, name, None)
        if inner is None:
            continue
        record = []

        def counted(input_ids, attention_mask, _inner=inner):
            record.append(attention_mask.sum())
            return _inner(input_ids, attention_mask)

        setattr(model, name, counted)
        return record
    return None


def _timer(warmup: int):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, args, state, control, **kwargs):
            # only the two marks the timing uses wait for the GPU: a synchronize every step would
            # keep the host from queueing the next step's work while the GPU finishes this one
            if torch.cuda.is_available() and state.global_step in (warmup, state.max_steps):
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())
            if state.global_step == warmup:
                cache = getattr(kwargs.get("model"), "context_cache", None)
                self.cache_misses_at_warmup = None if cache is None else cache.misses
                self.context_passes_at_warmup = len(getattr(self, "context_passes", None) or [])
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()

    return StepTimer()


def SyncCensus(warmup: int, steps: int):
    """A ``TrainerCallback`` that counts host syncs in ``steps`` steps after ``warmup``: torch's
    sync debug mode warns at each synchronizing CUDA call, and each warning is filed under the
    innermost stack frames of this repository and of transformers/accelerate/peft."""
    import collections
    import traceback
    import warnings

    from transformers import TrainerCallback

    class _SyncCensus(TrainerCallback):
        def __init__(self):
            self.first, self.last, self.counts = warmup + 1, warmup + steps, collections.Counter()
            self._saved = None

        def _record(self, message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return self._saved(message, category, filename, lineno, file, line)
            frames = [f for f in traceback.extract_stack()[:-1] if any(
                k in f.filename for k in ("/recall/", "/memory/", "transformers/", "accelerate/", "peft/"))]
            key = " <- ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                              for f in reversed(frames[-2:])) or f"{filename}:{lineno}"
            self.counts[key] += 1

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == self.first:
                self._saved, warnings.showwarning = warnings.showwarning, self._record
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.last and self._saved is not None:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning, self._saved = self._saved, None

    return _SyncCensus()


def NanProbe():
    """``--nan_probe``: before each optimizer step, the trainable parameters whose gradient is
    not finite, recorded at the first step that has any (a host sync per step: diagnosis only)."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self):
            self.found = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if self.found is not None or model is None:
                return
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            if bad:
                self.found = {"step": state.global_step + 1, "parameters": len(bad), "first": bad[:12]}

    return Probe()


def _param_counts(model):
    """(transformer matmul weights of the base, trainable parameters)."""
    body = trainable = 0
    for name, p in model.named_parameters():
        shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 leaves an empty local tensor
        n = int(torch.Size(shape).numel())
        if p.requires_grad:
            trainable += n
        elif len(shape) == 2 and "embed_tokens" not in name and "lm_head" not in name:
            body += n
    return body, trainable


def build_trainer(opts, device, timer):
    """The real trainer of ``opts.step`` on a random model of ``opts.size`` and synthetic data;
    returns ``(trainer, counting collator, lm)``."""
    from transformers import AutoTokenizer

    from memory.decoding_step import SampleBuilder
    from memory.token_manager import RECALL_TOKEN, add_memory_tokens
    from recall.model_loading import materialize, resolve_model_source
    from recall.text_embedding_train import (RecallCollator, RecallMemoryTrainer, RecallTrainingArguments,
                                             build_recall_model, format_query)
    from recall.text_memory_train import (EnhancedTextMemoryTrainer, MemoryDecodingArguments, ResampledDataset,
                                          build_decoder_model)

    bf16 = opts.precision == "bf16"
    if opts.size == "default":  # the real default model (SmolLM2-135M-Instruct), fp32 weights
        from recall.model_loading import load_model_and_tokenizer

        loaded = load_model_and_tokenizer(device=str(device), precision="fp32")
        lm, tok = loaded.model, loaded.tokenizer
    else:
        tok = AutoTokenizer.from_pretrained(opts.tokenizer or materialize(resolve_model_source()))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        lm = random_model(opts.size, tok, torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32, device)
    token_ids = add_memory_tokens(lm, tok)
    memories, contexts, sft = synthetic_data(opts.memories, opts.seed)
    d = lm.config.hidden_size
    bank = torch.nn.functional.normalize(torch.randn(len(memories), d, generator=torch.Generator().manual_seed(0)),
                                         dim=-1)
    scope = getattr(opts, "adapter_scope", "all")
    workers = getattr(opts, "workers", 0)
    overrides = {k: getattr(opts, k, None) for k in ("learning_rate", "max_grad_norm")}  # None: the trainer's own
    common = dict(**{k: v for k, v in overrides.items() if v is not None}, output_dir=opts.work,
                  max_steps=opts.steps + opts.warmup, per_device_train_batch_size=opts.batch, save_strategy="no",
                  logging_steps=getattr(opts, "loss_every", 0) or 10 ** 6, report_to="none", bf16=bf16,
                  use_cpu=device.type == "cpu",
                  disable_tqdm=True, seed=opts.seed, deepspeed=opts.deepspeed, dataloader_pin_memory=device.type == "cuda",
                  compile_layers=opts.compile_layers, dataloader_num_workers=workers)
    if opts.step == "recall":
        # persistent workers for step 1 only; step 2 redraws its samples each epoch and refuses them
        common["dataloader_persistent_workers"] = workers > 0
        cache = {"context_cache_mb": opts.context_cache_mb} if getattr(opts, "context_cache_mb", None) is not None else {}
        args = RecallTrainingArguments(**common, adapter_scope=scope, lora_target_modules=opts.lora_targets or "auto",
                                       **cache)
        args.cpu_bf16_levers = not getattr(opts, "no_bf16_levers", False)  # read by recall.cpu_bf16.applies
        model = build_recall_model(lm, tok, args, d, list(token_ids.values()))
        data = [{"text": format_query(tok, c), "target": row} for row, ctxs in enumerate(contexts) for c in ctxs]
        collate = CountingCollator(RecallCollator(tok, token_ids[RECALL_TOKEN], args.max_length),
                                   token_ids[RECALL_TOKEN] if scope == "recall" else None, query=scope == "recall",
                                   attach=workers > 0)
        return RecallMemoryTrainer(model, args, bank, tok, token_ids[RECALL_TOKEN], train_dataset=data,
                                   data_collator=collate, callbacks=[timer]), collate, lm
    naive = getattr(opts, "naive", False)
    targets = opts.lora_targets or ("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" if scope == "recall"
                                    else None)
    args = MemoryDecodingArguments(**common, pad_to_multiple_of=opts.pad_multiple, head_on_all_positions=naive,
                                   packing=getattr(opts, "packing", False),
                                   length_grouped=getattr(opts, "length_grouping", False) and not naive,
                                   adapter_scope=scope, **({"lora_target_modules": targets} if targets else {}))
    args.cpu_bf16_levers = not getattr(opts, "no_bf16_levers", False)  # read by recall.cpu_bf16.applies
    if scope == "recall":  # as memory.decoding_step runs it: no pure SFT samples, no KD on them
        args.mix, args.kd_weight = ":".join(args.mix.split(":")[:2] + ["0"]), 0.0
    builder = SampleBuilder(tok, memories, contexts, sft, args.max_length, mix=args.mix)
    kd = builder.teacher_topk(lm, device=device) if args.kd_weight > 0 else None  # the base is the teacher
    model = build_decoder_model(lm, token_ids, args, d, memory_bank=bank)
    model.projector.fit_center(bank)
    n_anchors = sum(len(c) for c in contexts) + len(sft)
    anchors = torch.nn.functional.normalize(torch.randn(n_anchors, d), dim=-1)  # same cost as step 1's
    collate = _decode_collator(opts, args, tok, model, bank, anchors, kd, token_ids[RECALL_TOKEN], workers)
    data = ResampledDataset(builder.epoch, seed=opts.seed, group=opts.batch if args.length_grouped else 0)
    return EnhancedTextMemoryTrainer(model, args, bank, tok, data,
                                     data_collator=collate, callbacks=[timer]), collate, lm


def _decode_collator(opts, args, tok, model, bank, anchors, kd, recall_id: int, workers: int):
    """Step 2's counting collator, with the host-sync levers ``opts`` turns back off (each is
    the trainer's default): ``--nan_filter``, ``--blocking_copies``, ``--no_index_plan`` and
    ``--keep_attention_mask``. ``args`` is changed in place for the first two."""
    from recall.text_memory_train import DecodingCollator

    if getattr(opts, "nan_filter", False):
        args.logging_nan_inf_filter = True  # HF's default: a host sync per step
    if getattr(opts, "blocking_copies", False):  # each batch tensor copied to the GPU with a host sync
        args.accelerator_config.non_blocking = False
    plan_id = None if getattr(opts, "no_index_plan", False) else model.recall_id
    inner = DecodingCollator(tok.pad_token_id, bank, model.pad_id, anchors=anchors, kd=kd,
                             pad_to_multiple_of=args.pad_to_multiple_of, recall_id=plan_id, packed=args.packing)
    if getattr(opts, "keep_attention_mask", False):  # the single pass gets the padding mask as before
        inner = _MaskKept(inner)
    scope = getattr(opts, "adapter_scope", "all")
    return CountingCollator(inner, recall_id=recall_id if scope == "recall" else None, attach=workers > 0)


class _MaskKept:
    """A collator whose plans say "not right-padded", so the model passes the attention mask."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features):
        batch = self.inner(features)
        if "plan" in batch:
            batch["plan"]["right_padded"] = False
        return batch


def packing_check(trainer, collate, n: int) -> dict:
    """The step-2 loss of the epoch's first ``n`` samples as one padded batch and as one packed
    batch (``--check_packing``), eval mode (no injection noise), eager: on a GPU this compares
    the FlashAttention varlen kernel with the padded batch's attention, in the run's precision."""
    import copy

    inner = collate.inner
    while not hasattr(inner, "padded"):  # unwrap the benchmark's collator wrappers
        inner = inner.inner
    if inner.recall_id is None:
        raise ValueError("--check_packing needs the collator's index plan (drop --no_index_plan)")
    padded = inner.padded() if inner.packed else inner
    packed = copy.copy(padded)
    packed.packed = True
    features = [trainer.train_dataset[i] for i in range(min(n, len(trainer.train_dataset)))]
    model = trainer.model
    was_training = model.training
    model.eval()
    out = {}
    stance = getattr(torch.compiler, "set_stance", None)
    try:
        with torch.no_grad(), trainer.compute_loss_context_manager(), \
                (stance("force_eager") if stance else contextlib.nullcontext()):
            for name, c in (("padded", padded), ("packed", packed)):
                parts = model(**trainer._prepare_inputs(c(features)))
                out[name] = {k: round(float(v), 5) for k, v in parts.items()}
    finally:
        model.train(was_training)
    out["max_relative_difference"] = round(max(abs(out["packed"][k] - v) / max(abs(v), 1e-6)
                                               for k, v in out["padded"].items()), 5)
    return out


def train(trainer, device, profile_path: Optional[str], skip: int = 0) -> float:
    """``trainer.train()``, under torch.profiler when ``profile_path`` is given (the top
    operators by self CPU and by self device time go there); returns the wall seconds. The
    profile records the steps after the first ``skip`` (and one more, the profiler's own
    warm-up): compilation and autotuning in the first steps would otherwise dominate it."""
    started = time.perf_counter()
    if not profile_path:
        trainer.train()
        return time.perf_counter() - started
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    total = trainer.args.max_steps
    window = schedule(wait=max(skip - 1, 0), warmup=1, active=max(total - skip - 1, 1), repeat=1)

    class Step(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            prof.step()

    with profile(activities=acts, schedule=window) as prof:
        trainer.add_callback(Step())
        trainer.train()
    table = prof.key_averages()
    with open(profile_path, "w") as f:
        for key in ("self_cpu_time_total", "self_device_time_total" if device.type == "cuda" else None):
            if key:
                f.write(f"== sorted by {key}\n{table.table(sort_by=key, row_limit=25)}\n")
    return time.perf_counter() - started


def run(opts) -> dict:
    from recall.distributed import is_main, world_size

    device = torch.device(opts.device)
    if opts.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    timer = _timer(opts.warmup)
    trainer, collate, lm = build_trainer(opts, device, timer)
    timer.context_passes = _count_context_passes(trainer.model)
    if collate.attach:
        collate.count_steps(trainer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    census = SyncCensus(opts.warmup, opts.sync_census) if opts.sync_census and device.type == "cuda" else None
    if census is not None:
        trainer.add_callback(census)
    probe = NanProbe() if opts.nan_probe else None
    if probe is not None:
        trainer.add_callback(probe)
    check, checking = {}, opts.check_packing and opts.step == "decode"
    if checking:  # the untrained model (LoRA at zero: the base)
        check["before_training"] = packing_check(trainer, collate, opts.check_packing)
    wall = train(trainer, device, opts.profile, skip=opts.warmup)
    collate.collect()
    if checking:
        check["after_training"] = packing_check(trainer, collate, opts.check_packing)
    history = trainer.state.log_history
    marks = timer.marks
    timed = collate.batches[opts.warmup:opts.warmup + opts.steps]  # one batch per step, in order
    seconds = marks[-1] - marks[opts.warmup - 1] if opts.warmup else wall
    cfg = lm.config
    body, trainable = _param_counts(trainer.model)
    tokens = sum(b["tokens"] for b in timed)
    attn = sum(b["sq"] for b in timed) * cfg.num_hidden_layers * cfg.hidden_size  # 2 L d S per token, causal half
    head = sum(b["labelled"] for b in timed) * 2 * cfg.vocab_size * cfg.hidden_size
    forward = 2 * body * tokens + 2 * attn + head
    flops = 2 * forward + 4 * trainable * tokens  # frozen base: activation grads; trainables: + weight grads
    flops_6n = 3 * forward
    cache = getattr(trainer.model, "context_cache", None)
    # contexts_cached: every context of the timed steps came from the context cache (informational;
    # the FLOPs below count the context tokens that really ran)
    at_warmup = getattr(timer, "cache_misses_at_warmup", None)
    timed_misses = None if cache is None or at_warmup is None else cache.misses - at_warmup
    cached = timed_misses == 0
    context_run = None
    if all("tail_tokens" in b for b in timed):  # activated adapter: the context is forward only
        tail = sum(b["tail_tokens"] for b in timed)
        passes = getattr(timer, "context_passes", None)
        if passes is not None:  # the context tokens the timed steps really ran (cache misses, uncached batches)
            context_run = int(sum(int(t) for t in passes[getattr(timer, "context_passes_at_warmup", 0):]))
            ran = tail + context_run
            forward = 2 * body * ran + 2 * attn * ran / max(tokens, 1) + head
        backward = 2 * (2 * body * tail + 2 * attn * tail / max(tokens, 1) + head)
        flops = forward + backward + 4 * trainable * tail
        flops_6n = forward + 2 * (2 * body * tail + head)
    n = world_size()
    out = {"step": opts.step, "size": opts.size, "device": torch.cuda.get_device_name() if device.type == "cuda"
           else "cpu", "precision": opts.precision, "deepspeed": opts.deepspeed, "world_size": n,
           "batch_per_device": opts.batch, "pad_multiple": opts.pad_multiple,
           "cudnn_attention": not opts.no_cudnn_attention,
           "compile_layers": opts.compile_layers, "length_grouping": opts.length_grouping,
           "packing": getattr(opts, "packing", False),
           "workers": getattr(opts, "workers", 0),
           "adapter_scope": getattr(opts, "adapter_scope", "all"), "timed_steps": len(timed), "seconds": round(seconds, 3),
           "wall_seconds": round(wall, 1), "params_body": body, "params_trainable": trainable,
           "tokens_per_second": round(tokens * n / seconds, 1), "contexts_cached": cached,
           "context_cache_misses_timed": timed_misses, "context_tokens_run": context_run,
           "padding_fraction": round(1 - tokens / max(sum(b["padded"] for b in timed), 1), 3),
           "tflops_per_second": round(flops * n / seconds / 1e12, 4)}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        name = out["device"]
        nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)
        if nominal:
            out["nominal_bf16_tflops"] = nominal
            out["mfu"] = round(flops / seconds / 1e12 / nominal, 3)
            out["mfu_6n"] = round(flops_6n / seconds / 1e12 / nominal, 3)
    if census is not None:
        out["syncs_per_step"] = round(sum(census.counts.values()) / max(opts.sync_census, 1), 1)
        out["sync_sources"] = dict(census.counts.most_common(20))
    if check:
        out["packing_check"] = check
    final = next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None)
    out["train_loss"] = None if final is None else round(float(final), 4)  # the run's mean: NaN if training diverged
    if probe is not None:
        out["nan_probe"] = probe.found
    if opts.learning_rate is not None:
        out["learning_rate"] = opts.learning_rate
    if opts.max_grad_norm is not None:
        out["max_grad_norm"] = opts.max_grad_norm
    if opts.loss_every:
        out["losses"] = [[h["step"], round(float(h["loss"]), 4)] for h in history if "loss" in h]
    for flag in ("no_index_plan", "nan_filter", "blocking_copies", "keep_attention_mask"):
        if getattr(opts, flag, False):
            out[flag] = True
    if opts.peak and is_main():
        out["measured_peak_tflops"] = round(matmul_peak(device, torch.bfloat16 if opts.precision == "bf16" else torch.float32), 1)
        out["fraction_of_measured_peak"] = round(out["tflops_per_second"] / out["measured_peak_tflops"], 3)
    return out


def parser() -> argparse.ArgumentParser:
    """The command line; ``bench.speed`` takes its defaults from here too."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--step", choices=("recall", "decode"), default="decode")
    ap.add_argument("--size", choices=tuple(SIZES) + ("default",), default="1b",
                    help="a random Llama of this shape, or default: the real default model")
    ap.add_argument("--steps", type=int, default=200, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32, help="per device")
    ap.add_argument("--memories", type=int, default=256)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--deepspeed", default=None)
    ap.add_argument("--lora_targets", default=None, help="default: the trainer's own")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the default model's)")
    ap.add_argument("--peak", action="store_true", help="also measure a large matmul's TFLOP/s")
    ap.add_argument("--work", default="/tmp/gpu_train")
    ap.add_argument("--pad_multiple", type=int, default=1, help="step 2: round batch widths up to this")
    ap.add_argument("--naive", action="store_true",
                    help="step 2 baseline: LM head on every position (with --pad_multiple 192: pad to max_length)")
    ap.add_argument("--length_grouping", action="store_true", help="step 2: length-grouped batches")
    ap.add_argument("--packing", action="store_true",
                    help="step 2: packed batches, no padding, variable-length attention (recall/packing.py)")
    ap.add_argument("--check_packing", type=int, default=0, metavar="N",
                    help="step 2: before and after training, the loss of N samples padded vs packed (eager, eval)")
    ap.add_argument("--nan_probe", action="store_true",
                    help="record the first step whose gradients are not finite, and which parameters")
    ap.add_argument("--learning_rate", type=float, default=None, help="default: the trainer's own")
    ap.add_argument("--max_grad_norm", type=float, default=None,
                    help="default: the trainer's own (1.0); 0 turns clipping off, so --nan_probe sees the "
                         "parameters whose gradient is non-finite before a clip spreads it to all of them")
    ap.add_argument("--loss_every", type=int, default=0, metavar="K",
                    help="log the training loss every K steps into the result (a host sync each time)")
    ap.add_argument("--adapter_scope", choices=("all", "recall"), default="all",
                    help="the LoRA at every position (default here: the full-training workload) or the "
                         "activated adapter (the pipeline's default)")
    ap.add_argument("--compile_layers", action="store_true", help="torch.compile each transformer block")
    ap.add_argument("--workers", type=int, default=0,
                    help="data-loader worker processes (batches are collated ahead of the step that needs them)")
    ap.add_argument("--no_cudnn_attention", action="store_true", help="SDPA without its cuDNN backend")
    ap.add_argument("--profile", default=None, help="write a torch.profiler operator table to this file")
    ap.add_argument("--no_bf16_levers", action="store_true",
                    help="CPU bf16 autocast without recall/cpu_bf16.py (bf16 weight copies, fp32 attention)")
    ap.add_argument("--no_index_plan", action="store_true",
                    help="step 2: no collator index plan (the forward finds positions on the device)")
    ap.add_argument("--nan_filter", action="store_true", help="HF's logging_nan_inf_filter (a host sync per step)")
    ap.add_argument("--keep_attention_mask", action="store_true",
                    help="step 2: pass the padding mask to the single pass (the default drops it for right padding)")
    ap.add_argument("--blocking_copies", action="store_true",
                    help="step 2: accelerator_config.non_blocking off (the trainers turn it on by default)")
    ap.add_argument("--sync_census", type=int, default=0,
                    help="count the host syncs of this many steps after the warm-up, by source line")
    ap.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    ap.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None):
    opts = parser().parse_args(argv)
    if opts.deepspeed:
        from recall.distributed import init_process_group

        init_process_group(opts.deepspeed)
    out = run(opts)
    from recall.distributed import is_main

    if is_main():
        print(json.dumps(out), flush=True)
        if opts.json:
            with open(opts.json, "a") as f:
                f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
