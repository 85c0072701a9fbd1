"""Save and load the model side of a published version (see ``memory.publish`` for the
versioning): a plain HF checkpoint + ``recall_state.safetensors`` (memory projector and,
when the memory vectors have another width, step 1's query projector) +
``recall_config.json``; with an activated adapter (``recall.activation``) the checkpoint is
the base model with the memory tokens and the adapter is in ``memory_adapter/``."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import List, Optional

import torch
from safetensors.torch import load_file, save_file

from recall.generation import RecallEngine
from recall.text_memory_train import MemoryProjector

RECALL_STATE = "recall_state.safetensors"
RECALL_CONFIG = "recall_config.json"


@dataclasses.dataclass
class RecallModel:
    engine: RecallEngine
    config: dict
    loaded: object  # recall.model_loading.LoadedModel
    path: Path


def save_recall_model(directory: Path, lm, tokenizer, projector: MemoryProjector,
                      query_projector: Optional[torch.nn.Module], config: dict) -> List[str]:
    """Write the model files into ``directory``; returns the relative paths written."""
    from recall.activation import ADAPTER_DIR, is_activated

    directory = Path(directory)
    activated = is_activated(lm)
    if activated:  # the base checkpoint (memory tokens included) + the activated adapter beside it,
        # without the embeddings, which the base checkpoint holds
        lm.save_pretrained(directory / ADAPTER_DIR, save_embedding_layers=False)
        copy.deepcopy(lm).unload().save_pretrained(directory)
    else:
        lm.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    state = {f"projector.{k}": v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
    if query_projector is not None:
        state.update({f"query_projector.{k}": v.detach().cpu().contiguous()
                      for k, v in query_projector.state_dict().items()})
    save_file(state, str(directory / RECALL_STATE))
    body = {**config, "memory_dim": projector.memory_dim, "hidden_size": projector.hidden_size,
            "projector_hidden": 0 if projector.mlp is None else projector.mlp[0].out_features,
            "query_projector": query_projector is not None, "adapter_scope": "recall" if activated else "all"}
    # the directory is a version being staged: it becomes visible only when memory.publish writes
    # its manifest, so a plain write is safe here
    (directory / RECALL_CONFIG).write_text(json.dumps(body, indent=2, ensure_ascii=False, default=str) + "\n")
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def load_recall_model(directory, *, device: str = "auto", precision: str = "auto") -> RecallModel:
    """A published version (or any directory written by ``save_recall_model``) as a ``RecallEngine``."""
    from recall.model_loading import load_model_and_tokenizer

    directory = Path(directory)
    cfg_path = directory / RECALL_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory}: not a recall model version (no {RECALL_CONFIG})")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    loaded = load_model_and_tokenizer(str(directory), device=device, precision=precision)
    state = load_file(str(directory / RECALL_STATE))
    projector = MemoryProjector(cfg["memory_dim"], cfg["hidden_size"], 1.0, cfg["projector_hidden"])
    projector.load_state_dict({k.removeprefix("projector."): v for k, v in state.items()
                               if k.startswith("projector.")})
    query_projector = None
    if cfg.get("query_projector"):
        w = state["query_projector.weight"]
        query_projector = torch.nn.Linear(w.shape[1], w.shape[0], bias="query_projector.bias" in state)
        query_projector.load_state_dict({k.removeprefix("query_projector."): v for k, v in state.items()
                                         if k.startswith("query_projector.")})
    device_ = loaded.runtime.device
    if cfg.get("adapter_scope", "all") == "recall":  # the activated adapter (recall.activation)
        from peft import PeftModel

        from recall.activation import ADAPTER_DIR

        loaded.model = PeftModel.from_pretrained(loaded.model, str(directory / ADAPTER_DIR)).eval()
    projector.to(device_).eval()
    if query_projector is not None:
        query_projector.to(device_).eval()
    engine = RecallEngine(loaded.model, loaded.tokenizer, cfg["token_ids"], projector, query_projector,
                          cfg.get("activation_phrase", "Let me check my memory."), loaded.runtime.autocast_dtype)
    return RecallModel(engine, cfg, loaded, directory)
