"""Training under bf16 autocast on a CPU with bf16 units (AVX512-BF16, AMX): two levers that
keep the numbers autocast computes and drop work it does not need.

Measured with step 2's activated adapter on the default model (``bench.gpu_train``, 2-core AMD
EPYC with AVX512-BF16; README "Hardware notes"), the matmuls already ran at the bf16 peak and
the rest of a step did not:

- **bf16 copies of the frozen linear weights.** Autocast casts an fp32 weight to bf16 at every
  call unless the weight is a leaf that requires grad, so the frozen base's 135M weights were
  cast again in every forward pass. Here each frozen ``nn.Linear`` (the LM head included) gets
  a bf16 copy made once, and uses it while bf16 autocast is on. The copy is exactly what
  autocast's cast would give (the same round-to-nearest), so the numbers do not change; the
  fp32 weights stay the parameters, so checkpoints, merges and saved models are untouched.
- **fp32 attention.** torch's CPU flash-attention backward ran 4x slower in bf16 than in fp32
  (10 ms against 2.5 ms a call on the same shapes). Inside the block, attention runs the
  transformers SDPA function on fp32 query/key/value and hands bf16 back.

Both are on only inside :func:`bf16_cpu_training`, which both trainers enter around
``train()`` and step 2 enters around its preserve targets (the same forward, the same numbers).
They stay off on a GPU, under DeepSpeed (partitioned weights), and without bf16 autocast.
"""
from __future__ import annotations

import contextlib
from typing import List

import torch
import torch.nn.functional as F

ATTENTION = "recall_sdpa_fp32"


def register() -> None:
    """Make ``ATTENTION`` a valid ``attn_implementation`` name, with SDPA's mask (idempotent).
    Without a mask function of its own, transformers builds no mask for an unknown name: the
    padding of cached contexts would be attended to."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, fp32_sdpa_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def fp32_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention on fp32 query/key/value, with autocast off; the output
    comes back in the query's dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


class _Bf16Linear:
    """A frozen linear's forward (an instance attribute) that multiplies by a bf16 copy of its
    weight while CPU bf16 autocast is on, and by the fp32 weight otherwise."""

    def __init__(self, module: torch.nn.Linear):
        self.module = module
        self.weight = module.weight.detach().to(torch.bfloat16)

    def __call__(self, x):
        module = self.module
        if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
            return F.linear(x, self.weight, module.bias)
        return F.linear(x, module.weight, module.bias)


def applies(args, device) -> bool:
    """True when a trainer with ``args`` trains under bf16 autocast on a CPU without DeepSpeed
    (and ``args.cpu_bf16_levers``, an attribute only ``bench.gpu_train --no_bf16_levers`` sets to
    False for its baseline row, is not False)."""
    return bool(getattr(args, "bf16", False)) and torch.device(device).type == "cpu" and \
        not getattr(args, "deepspeed", None) and getattr(args, "cpu_bf16_levers", True) is not False


def _frozen_linears(model) -> List[torch.nn.Linear]:
    out = []
    for module in model.modules():
        if type(module) is not torch.nn.Linear or "forward" in module.__dict__:
            continue
        weight = module.weight
        if weight.requires_grad or weight.dtype != torch.float32 or weight.device.type != "cpu" or \
                hasattr(weight, "ds_id"):  # trained, already low precision, elsewhere, or partitioned
            continue
        out.append(module)
    return out


def _configs(model):
    from recall.get_text_embedding import backbone

    found = {}
    for m in (model, getattr(model, "lm", None), backbone(getattr(model, "lm", model))):
        config = getattr(m, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
            found[id(config)] = config
    return list(found.values())


@contextlib.contextmanager
def bf16_cpu_training(model, args, device):
    """Inside the block, ``model``'s frozen linears use bf16 copies of their weights and its
    attention runs in fp32, when :func:`applies` (else a no-op). Restored on exit, also on error."""
    if not applies(args, device):
        yield
        return
    register()
    linears = _frozen_linears(model)
    configs = _configs(model)
    try:
        for module in linears:
            module.forward = _Bf16Linear(module)
        for config in configs:
            config._attn_implementation = ATTENTION
        yield
    finally:
        for module in linears:
            module.__dict__.pop("forward", None)
        for config in configs:
            config._attn_implementation = "sdpa"
