"""Regional ``torch.compile``: compile each transformer block, not the whole model.

The trainers' own code around the backbone (the ``<|memory_pad|>`` injection, the losses over
a variable number of labelled positions) is data-dependent and would break a whole-model
graph into pieces and recompile often. The decoder blocks are where the time goes, they are
identical code, and with inlined module parameters (torch's default) one compiled block
serves every layer: the compile cost is about one layer's, whatever the depth. The first
new sequence length makes the graph dynamic in length, so later batches of other widths
reuse it.

What it buys: fused elementwise work (RMSNorm, rotary, SiLU-gate, LoRA's scale-and-add,
residual adds) and far fewer kernel launches, which is where a small-batch LoRA step loses
its time on a GPU (see ``bench/gpu_train.py``). Not for ZeRO-3: its parameter-fetch hooks run
inside the blocks.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn


def decoder_layers(model) -> nn.ModuleList:
    """The list of transformer blocks of an HF causal LM, PEFT-wrapped or not."""
    from recall.get_text_embedding import backbone

    body = backbone(model)
    layers = getattr(body, "layers", None) or getattr(body, "h", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"compile_layers: found no transformer blocks (.layers or .h) in {type(body).__name__}")
    return layers


def compile_layers(model, deepspeed_config=None, **compile_kwargs) -> List[nn.Module]:
    """``torch.compile`` every transformer block of ``model`` in place (``nn.Module.compile``,
    so parameters, state dicts and PEFT's adapters are untouched); returns the blocks."""
    if zero_stage(deepspeed_config) == 3:
        raise ValueError("compile_layers does not work under DeepSpeed ZeRO-3 (its parameter gathering hooks run "
                         "inside the compiled blocks); use ZeRO-2, or turn compile_layers off")
    if not hasattr(torch, "compile"):
        raise RuntimeError(f"compile_layers needs torch.compile (torch {torch.__version__})")
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(**compile_kwargs)
    return list(layers)


def zero_stage(config) -> int:
    """The ZeRO stage of a DeepSpeed config (a path or a dict; none: 0)."""
    if not config:
        return 0
    if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__"):
        import json

        with open(config) as f:
            config = json.load(f)
    return int((config.get("zero_optimization") or {}).get("stage", 0) or 0)
