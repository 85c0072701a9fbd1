"""Packed step-2 batches: every sample of a batch laid end to end in one row, no padding.

A padded batch runs its matmuls over the padding too: with length-grouped batches of 128 that
was 8.5% of the tokens a step-2 step computed on a GPU (``bench/gpu_train.py``). A packed batch
is one row of ``sum(lengths)`` tokens; ``position_ids`` restart at 0 for each sample, and
attention is **variable-length**: each token attends causally within its own sample only,
given by the cumulative sample lengths ``cu_seq_lens`` (0, l1, l1 + l2, ...).

The attention is registered with transformers as ``ATTENTION`` and switched on for the packed
forward only (``packed_attention``); everything else (generation, the decode check, padded
batches) keeps the model's own implementation. transformers builds no mask for an attention
implementation it has no mask function for, so a packed forward makes no (T x T) mask and
no host sync testing the position ids for packing.

- On a CUDA device in bf16/fp16: torch's FlashAttention varlen kernel
  (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10), which skips the work between
  samples entirely.
- Elsewhere (CPU, fp32): causal scaled-dot-product attention over each sample in turn
  (``sample_by_sample_varlen``). Correct, but one small attention call per sample: packing is a GPU
  lever, and on a CPU the padded, length-grouped batches are the faster layout.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
import torch.nn.functional as F

ATTENTION = "recall_varlen"
_VARLEN = {}  # the resolved kernel and how to call it (its signature changed across torch versions)


def register() -> None:
    """Make ``ATTENTION`` a valid ``attn_implementation`` name (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, varlen_attention_forward)
    if not _VARLEN:  # resolved here, outside any compiled region (torch.compile traces the attention)
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _VARLEN.update(fn=None, params=frozenset())
        else:
            _VARLEN.update(fn=varlen_attn, params=frozenset(inspect.signature(varlen_attn).parameters))


@contextlib.contextmanager
def packed_attention(model):
    """Run ``model``'s attention layers as variable-length attention inside the block. The
    forward must pass ``cu_seq_lens_q`` / ``max_length_q`` (transformers hands extra forward
    keywords down to the attention function)."""
    from recall.get_text_embedding import backbone

    register()
    configs = {id(c): c for c in (getattr(model, "config", None), getattr(backbone(model), "config", None)) if c}
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = ATTENTION
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]


def varlen_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, **kwargs):
    """transformers' attention-function interface: ``query`` (1, H, T, D), ``key``/``value``
    (1, H_kv, T, D), one packed row; returns ``((1, T, H, D), None)``."""
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None or max_len is None:
        raise ValueError(f"attention {ATTENTION!r} needs cu_seq_lens_q and max_length_q (a packed batch's plan); "
                         "it is meant to be switched on by recall.packing.packed_attention for a packed forward")
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row, got a batch of {query.shape[0]}")
    if dropout:
        raise ValueError("packed attention does not implement attention dropout")
    groups = query.shape[1] // key.shape[1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, D)
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        out = _flash_varlen(q, k, v, cu.to(device=q.device, dtype=torch.int32), int(max_len), scale, groups)
    else:
        out = sample_by_sample_varlen(q, k, v, cu, scale, groups)
    return out.unsqueeze(0), None


def _flash_varlen(q, k, v, cu, max_len: int, scale: float, groups: int) -> torch.Tensor:
    if not _VARLEN:
        register()
    if _VARLEN["fn"] is None:
        raise RuntimeError(f"packed step-2 batches on a GPU need torch >= 2.10 (torch.nn.attention.varlen), "
                           f"this is torch {torch.__version__}")
    params, extra = _VARLEN["params"], {}
    if "is_causal" in params:  # torch 2.10
        extra["is_causal"] = True
    else:  # later: causal is the window (-1, 0)
        extra["window_size"] = (-1, 0)
    if "scale" in params:
        extra["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-6:
        raise RuntimeError(f"this torch's varlen_attn has no scale argument, and the model scales by {scale}")
    if groups > 1:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:  # query head h reads key/value head h // groups, as transformers' repeat_kv lays them out
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return _VARLEN["fn"](q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, **extra)


def sample_by_sample_varlen(q, k, v, cu: torch.Tensor, scale: float, groups: int = 1) -> torch.Tensor:
    """Reference variable-length causal attention: causal SDPA over each sample on its own.
    ``q`` (T, H, D), ``k``/``v`` (T, H_kv, D), ``cu`` (N + 1,) cumulative lengths; (T, H, D).
    Memory grows with the longest sample, not with the packed row (a block-diagonal mask over
    a batch of 128 samples would be a (17k x 17k) score matrix per head)."""
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    bounds = cu.tolist()
    parts = [F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                            is_causal=True, scale=scale).transpose(0, 1)
             for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return torch.cat(parts) if parts else q.new_zeros(q.shape)
