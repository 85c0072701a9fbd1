"""The activated memory adapter (``--adapter_scope recall``, the default).

With scope "all" the LoRA of steps 1 and 2 acts at every position and is merged into the
published weights, so ordinary chat runs on changed weights (the drift ``evaluate.py``
reports as forgetting). With scope "recall" the adapter is an *activated* LoRA (PEFT's
aLoRA, ``LoraConfig.alora_invocation_tokens``): it acts only from ``<recall>`` onwards.
Everything before it, the conversation, runs through the base model, so:

- a turn without ``<recall>`` is exactly the base model's (nothing to forget);
- the KV cache of the context is the base model's, so serving can reuse a prefix cache
  computed without the adapter, and training needs no gradient through the context
  (steps 1 and 2 run the context without gradient and back-propagate through the tokens
  from ``<recall>`` on only);
- the adapter cannot be merged into the weights: a version keeps it next to the base
  checkpoint (``memory_adapter/``), and a plain ``from_pretrained`` of the version is the
  base model with the memory tokens added.

PEFT computes aLoRA offsets from ``input_ids`` in ``PeftModel.forward``. Our models run the
backbone on ``inputs_embeds`` (memory vectors replace embeddings) and feed one token at a
time on a KV cache, so ``adapter_active`` passes the offsets explicitly: per row, how many
of the *current* input's last positions the adapter acts on.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

ADAPTER_SCOPES = ("all", "recall")
ADAPTER_DIR = "memory_adapter"


def check_scope(scope: str) -> str:
    if scope not in ADAPTER_SCOPES:
        raise ValueError(f"adapter_scope: expected one of {', '.join(ADAPTER_SCOPES)}, got {scope!r}")
    return scope


def lora_config(targets: Sequence[str], r: int, alpha: int, dropout: float, scope: str, recall_token_id: int):
    """A ``LoraConfig`` for ``scope``: plain LoRA ("all") or aLoRA invoked by ``<recall>``."""
    from peft import LoraConfig

    check_scope(scope)
    extra = {"alora_invocation_tokens": [int(recall_token_id)], "task_type": "CAUSAL_LM"} if scope == "recall" else {}
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                      **extra)


def load_lora_state(peft_lm, state: dict, source: str) -> None:
    """Copy LoRA tensors (``base_model.model....lora_A.default.weight`` keys; other keys are
    ignored) into ``peft_lm`` to continue training them: step 2 continuing step 1's activated
    adapter, or an incremental cycle continuing the current version's. Missing layers or another
    rank are refused with an error naming ``source``."""
    import torch

    own = {k: v for k, v in state.items() if ".lora_" in k}
    params = dict(peft_lm.named_parameters())
    missing = sorted(k for k in own if k not in params)
    if missing:
        raise ValueError(f"{source}: its LoRA has layers this adapter lacks ({missing[:3]}...): the adapter "
                         f"continuing it needs the same (or more) target modules")
    with torch.no_grad():
        for k, v in own.items():
            if params[k].shape != v.shape:
                raise ValueError(f"{source}: LoRA {k} has shape {tuple(v.shape)}, the adapter continuing it "
                                 f"{tuple(params[k].shape)} (the same rank is needed)")
            params[k].copy_(v)


class _Gate:
    """Forward pre-hooks on every LoRA layer, installed once per model, that pass the current
    ``alora_offsets`` (None: leave the call alone). Re-registering hooks on every forward
    would cost a Python loop over all LoRA layers per generated token."""

    def __init__(self):
        self.offsets = None

    def __call__(self, module, args, kwargs):
        if self.offsets is not None:
            kwargs["alora_offsets"] = self.offsets
        return args, kwargs


def _gate(model) -> _Gate:
    from peft.tuners.lora import LoraLayer

    gate = model.__dict__.get("_memory_adapter_gate")
    if gate is None:
        gate = _Gate()
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.register_forward_pre_hook(gate, with_kwargs=True)
        model.__dict__["_memory_adapter_gate"] = gate
    return gate


@contextlib.contextmanager
def adapter_active(model, offsets: Sequence[int]):
    """Run ``model``'s aLoRA layers on the last ``offsets[b]`` positions of row ``b`` of the
    next forward passes (0: not at all). Outside this context an activated adapter acts
    nowhere (or where PEFT's own ``forward`` finds ``<recall>`` in ``input_ids``)."""
    gate = _gate(model)
    previous, gate.offsets = gate.offsets, [int(o) for o in offsets]
    try:
        yield
    finally:
        gate.offsets = previous


def base_context_pass(model, **inputs):
    """The backbone over a context with the activated adapter acting nowhere and no gradient:
    the base model's states and KV cache (``inputs``: ``input_ids`` or ``inputs_embeds``, and
    ``attention_mask``). Used by both trainers for everything before ``<recall>``."""
    import torch

    from recall.get_text_embedding import backbone

    rows = (inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs["inputs_embeds"]).shape[0]
    with torch.no_grad(), adapter_active(model, [0] * rows):
        return backbone(model)(**inputs, use_cache=True)


def is_activated(model) -> bool:
    """True when ``model`` (a PEFT model) carries an activated (aLoRA) adapter."""
    config = getattr(model, "peft_config", None) or {}
    return any(getattr(c, "alora_invocation_tokens", None) for c in config.values())


def use_fast_forward(model) -> None:
    """Give ``model``'s aLoRA layers a lean forward: the base layer, plus the low-rank update
    on the activated positions only, with no per-call bookkeeping.

    PEFT's generic ``lora.Linear.forward`` (argument checks, adapter loops, the variant's mask
    built per layer and a boolean-mask scatter) costs more than the matmuls of a small model:
    measured here, plain decoding steps of the 135M model went from about 80 ms to 130 ms,
    and a step-2 training step over tails activated at every position ran 1.5x slower. The
    math is the same as ``ALoraLinearVariant`` (the last ``alora_offsets[b]`` positions of
    row ``b``). In training mode, or with dropout, a *partly* activated input falls back to
    PEFT's own forward; an input activated everywhere (the tail passes of both trainers) or
    nowhere (their context passes) takes the lean path with gradient. Idempotent."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if not isinstance(module, LoraLayer) or "forward" in module.__dict__ or not hasattr(module, "base_layer"):
            continue
        names = [n for n in module.active_adapters if n in module.lora_A]
        if len(names) != 1:
            continue
        module.forward = _LeanForward(module, names[0])


class _LeanForward:
    """A module's lean forward (an instance attribute). It holds the module, not its
    sub-layers, so a ``copy.deepcopy`` of the model gets a forward bound to the copy."""

    def __init__(self, module, name: str):
        self.module, self.name = module, name

    def __call__(self, x, *args, **kwargs):
        import torch

        module, name = self.module, self.name
        if kwargs.get("adapter_names") is not None or list(module.active_adapters) != [name]:
            return type(module).forward(module, x, *args, **kwargs)
        dropout = module.lora_dropout[name]
        offsets = kwargs.get("alora_offsets")
        if offsets is not None:  # PEFT's own offsets say None for a row without <recall>
            offsets = [0 if o is None else int(o) for o in offsets]
        width = x.shape[-2] if x.dim() == 3 else 1
        everywhere = bool(offsets) and min(offsets) >= width
        nowhere = offsets is not None and not any(offsets)
        if (module.training or not isinstance(dropout, torch.nn.Identity)) and not (everywhere or nowhere):
            return type(module).forward(module, x, *args, **kwargs)  # PEFT's masked path (with its dropout)
        kwargs.pop("alora_offsets", None)
        result = module.base_layer(x, *args, **kwargs)
        if module.disable_adapters or module.merged or not offsets or nowhere:
            return result
        lora_a, lora_b, scaling = module.lora_A[name], module.lora_B[name], module.scaling[name]
        if everywhere:  # plain LoRA: no mask to build or scatter through
            return result + (lora_b(lora_a(dropout(x.to(lora_a.weight.dtype)))) * scaling).to(result.dtype)
        limit = torch.tensor([min(o, width) for o in offsets], device=x.device)
        mask = (torch.arange(width, device=x.device)[None] >= (width - limit)[:, None]).reshape(-1)
        flat = result.reshape(-1, result.shape[-1]).clone()
        picked = x.reshape(-1, x.shape[-1])[mask].to(lora_a.weight.dtype)
        flat[mask] += (lora_b(lora_a(picked)) * scaling).to(flat.dtype)
        return flat.view(result.shape)
