"""Which modules the LoRA of steps 1 and 2 adapts, for any causal-LM family.

``auto`` is read off the model itself: the linear layers of its first transformer block
(``nn.Linear``, and GPT-2's ``Conv1D``), by their leaf names, so it holds for Llama-style
``q_proj ... down_proj``, Phi-3's fused ``qkv_proj`` / ``gate_up_proj``, GPT-2's ``c_attn`` /
``c_proj`` / ``c_fc`` and GPT-NeoX's ``query_key_value`` / ``dense*`` alike:

- step 1 with the activated adapter (``recall``): every projection of the block (they act on
  a few positions and cost almost nothing);
- step 1 with the adapter at every position (``all``): the attention's query and value
  projections, or the fused projection that holds them;
- step 2: every projection but a separate key and gate projection (Llama: ``q_proj, v_proj,
  o_proj, up_proj, down_proj``).

Names given by hand are checked against the block, so a typo or another family's name is an
error that lists the model's own projections instead of PEFT's "not found".
"""
from __future__ import annotations

from typing import List, Sequence

from torch import nn

from recall.model_loading import ModelError

STEP2_SKIPPED = ("k_proj", "gate_proj")
QUERY_VALUE = ("q_proj", "v_proj")
FUSED_QKV = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv", "W_pack")


def _blocks(model) -> nn.ModuleList:
    """The ModuleList of the model's transformer blocks (as many as its config has layers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and n and len(module) == n:
            return module
    raise ModelError(f"lora_target_modules auto: cannot find the transformer blocks of {type(base).__name__} "
                     f"(no list of {n} layers); give --lora_target_modules by name")


def block_projections(model) -> List[str]:
    """Leaf names of the linear layers of the model's first transformer block, in order."""
    from transformers.pytorch_utils import Conv1D

    names: List[str] = []
    for name, module in _blocks(model)[0].named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and "lora_" not in name:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    if not names:
        raise ModelError(f"lora_target_modules auto: {type(model).__name__}'s blocks hold no linear layer")
    return names


def auto_targets(model, kind: str) -> List[str]:
    """``kind``: "recall" (step 1, activated), "all" (step 1, every position) or "decode" (step 2)."""
    names = block_projections(model)
    if kind == "recall":
        return names
    if kind == "all":
        if all(n in names for n in QUERY_VALUE):
            return list(QUERY_VALUE)
        fused = [n for n in FUSED_QKV if n in names]
        if fused:
            return fused[:1]
        raise ModelError(f"lora_target_modules auto: no query/value projection among {', '.join(names)}; "
                         "give --lora_target_modules by name")
    if kind == "decode":
        return [n for n in names if n not in STEP2_SKIPPED]
    raise ModelError(f"unknown target kind {kind!r}")


def resolve_targets(model, spec: str, kind: str) -> List[str]:
    """The leaf module names ``spec`` names for ``model``: a comma-separated list where
    ``auto`` expands to ``auto_targets(model, kind)``; every name must be one of the block's
    projections."""
    wanted: List[str] = []
    for item in (t.strip() for t in str(spec).split(",")):
        for name in (auto_targets(model, kind) if item == "auto" else [item] if item else []):
            if name not in wanted:
                wanted.append(name)
    check_targets(model, wanted)
    return wanted


def check_targets(model, names: Sequence[str]) -> None:
    if not names:
        raise ModelError("lora_target_modules: no module named")
    present = block_projections(model)
    missing = [n for n in names if n not in present]
    if missing:
        raise ModelError(f"lora_target_modules: {', '.join(missing)} not in this model's blocks "
                         f"({type(model).__name__}: {', '.join(present)}); use auto or these names")
