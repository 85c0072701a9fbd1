"""Memory vectors: the final hidden state at the last token of a text.

``extract_last_token_embedding`` is the design document's name. It pools the last
real (non-pad) token of each text, whatever the tokenizer's padding side, runs the
backbone only (no LM head: a 49k-wide vocabulary projection would be wasted work)
and sorts texts by length so batches carry little padding.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence

import torch

# Chosen by measurement (bench/embedding_template.py): see README "Memory vectors".
TEMPLATES = {
    "raw": "{text}",
    "prompteol": 'This sentence : "{text}" means in one word:"',
}


def backbone(model):
    """The transformer without its LM head, for HF and PEFT-wrapped causal LMs."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    return inner if inner is not None else model


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token per row; right and left padding both work."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


def _tokenize(tokenizer, texts: Sequence[str], max_length: int):
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"  # keep the tokens next to the pooled position
    try:
        return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                         return_tensors="pt", add_special_tokens=False)
    finally:
        tokenizer.truncation_side = side


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` for ``dtype`` on ``device``'s type, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def extract_last_token_embedding(model, tokenizer, texts: Sequence[str], *,
                                 template: str = "{text}", batch_size: int = 32,
                                 max_length: int = 256, normalize: bool = True,
                                 autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Return a float32 tensor (len(texts), hidden_size) of last-token final hidden states.

    ``template`` is a format string with ``{text}`` (e.g. ``TEMPLATES["prompteol"]`` or
    ``"{text}<recall>"``). ``autocast_dtype`` (e.g. ``Runtime.autocast_dtype``) runs
    the forward pass under autocast; None keeps full precision.
    """
    if not texts:
        return torch.empty(0, model.config.hidden_size)
    empty = [i for i, t in enumerate(texts) if not str(t).strip()]
    if empty:
        raise ValueError(f"extract_last_token_embedding: texts{empty[:5]} are empty; an empty text has no last token")
    body = backbone(model)
    device = next(model.parameters()).device
    prompts = [template.format(text=t) for t in texts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = torch.empty(len(prompts), model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = _tokenize(tokenizer, [prompts[i] for i in idx], max_length).to(device)
        with autocast(device, autocast_dtype):
            hidden = body(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=device)
        pooled = hidden[rows, last_token_positions(enc["attention_mask"])].float()
        out[idx] = pooled.cpu()
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def encode_by_length(texts: Sequence[str], encode: Callable[[List[str]], torch.Tensor],
                     batch_size: int) -> torch.Tensor:
    """``encode`` (a batch of texts -> one row each) over ``texts``, with each distinct text
    encoded once and batches made of texts of similar length, so a padded batch wastes little;
    the rows come back in input order. The query texts of a cycle repeat (every memory's
    neutral context) and vary in length (questions against whole chat turns): on the default
    run this cut the padded tokens of step 2's anchor queries by half."""
    unique = list(dict.fromkeys(texts))
    order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
    parts = [encode([unique[i] for i in order[start:start + batch_size]])
             for start in range(0, len(order), batch_size)]
    if not parts:
        raise ValueError("encode_by_length: no texts")
    rows = torch.cat(parts)
    placed = torch.empty_like(rows)
    placed[torch.tensor(order)] = rows
    where = {t: i for i, t in enumerate(unique)}
    return placed[torch.tensor([where[t] for t in texts])]


@torch.no_grad()
def mean_pooled_embedding(model, tokenizer, texts: Sequence[str], *, batch_size: int = 64,
                          max_length: int = 256, normalize: bool = True) -> torch.Tensor:
    """Sentence-transformers style mean pooling over real tokens (for encoder models)."""
    def encode(batch: List[str]) -> torch.Tensor:
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).float()

    vectors = encode_by_length(list(texts), encode, batch_size) if len(texts) else \
        torch.empty(0, model.config.hidden_size)
    return torch.nn.functional.normalize(vectors, dim=-1) if normalize else vectors
