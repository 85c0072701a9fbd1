"""The three special tokens of trained recall and how they enter a model.

``<recall>``        the model emits it when it wants a memory; its final hidden state is the query.
``<|memory_pad|>``  a placeholder whose *input embedding* is replaced by the retrieved memory vector.
``</recall>``       closes the decoded memory text.
"""
from __future__ import annotations

import logging
from typing import Dict, List

import torch

logger = logging.getLogger(__name__)

RECALL_TOKEN = "<recall>"
RECALL_END_TOKEN = "</recall>"
MEMORY_PAD_TOKEN = "<|memory_pad|>"
MEMORY_TOKENS = (RECALL_TOKEN, RECALL_END_TOKEN, MEMORY_PAD_TOKEN)

# New rows start at the mean embedding of words that mean something close, so the
# model begins from a sensible point in its embedding space rather than noise.
INIT_WORDS: Dict[str, List[str]] = {
    RECALL_TOKEN: ["recall", "remember", "memory", "retrieve"],
    RECALL_END_TOKEN: ["end", "done", "remembered", "."],
    MEMORY_PAD_TOKEN: ["memory", "fact", "note", "information"],
}


def memory_token_ids(tokenizer) -> Dict[str, int]:
    """Ids of the three tokens; raises if the tokenizer has not been extended."""
    ids = {}
    for tok in MEMORY_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != tok:
            raise KeyError(f"tokenizer has no {tok!r} token: call add_memory_tokens first")
        ids[tok] = tid
    return ids


def _mean_word_embedding(tokenizer, weight: torch.Tensor, words: List[str]) -> torch.Tensor:
    ids = []
    for w in words:
        ids += tokenizer.encode(" " + w, add_special_tokens=False)
    ids = [i for i in ids if i < weight.shape[0]]
    return weight[ids].float().mean(dim=0)


def _init_rows(model, tokenizer, new_ids: Dict[str, int]) -> None:
    embeddings = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != embeddings[0].data_ptr():
        embeddings.append(out.weight)  # untied output head: initialise its rows too
    with torch.no_grad():
        for weight in embeddings:
            for tok, tid in new_ids.items():
                row = _mean_word_embedding(tokenizer, weight, INIT_WORDS[tok])
                weight[tid] = row.to(weight.dtype)


def add_memory_tokens(model, tokenizer) -> Dict[str, int]:
    """Add the memory tokens as special tokens, grow the embeddings only if needed and
    initialise the new rows. Idempotent: an already-extended model/tokenizer is left as is.

    Some checkpoints pad their embedding matrix beyond ``len(tokenizer)``; new ids may
    then already have rows, and we never shrink the matrix to the tokenizer size.
    """
    missing = [t for t in MEMORY_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing},
                                     replace_extra_special_tokens=False)
    ids = memory_token_ids(tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    needed = max(ids.values()) + 1
    if needed > rows:
        model.resize_token_embeddings(needed, pad_to_multiple_of=64, mean_resizing=False)
        logger.info("resized embeddings %d -> %d rows", rows,
                    model.get_input_embeddings().weight.shape[0])
    fresh = {t: ids[t] for t in missing}
    if fresh:
        _init_rows(model, tokenizer, fresh)
        logger.info("added special tokens %s", sorted(fresh))
    return ids
