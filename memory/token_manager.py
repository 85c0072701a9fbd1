"""The three special tokens of trained recall and how they enter a model.

``<recall>``        the model emits it when it wants a memory; its final hidden state is the query.
``<|memory_pad|>``  a placeholder whose *input embedding* is replaced by the retrieved memory vector.
``</recall>``       closes the decoded memory text.
"""
from __future__ import annotations

import logging
import re
from typing import Dict, List, Sequence

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


# chat-template markers of most model families: <|im_start|>, <|eot_id|>, <|endoftext|>, ...
_MARKER = r"<\|[^\s<>|]{1,64}\|>"
_CACHE_ATTR = "_recall_memory_reserved"  # (vocabulary size, pattern), kept on the tokenizer itself


def _reserved(tokenizer) -> "re.Pattern":
    size = len(tokenizer) if tokenizer is not None else 0
    cached = getattr(tokenizer, _CACHE_ATTR, None)
    if cached is not None and cached[0] == size:  # a tokenizer that gained tokens is read again
        return cached[1]
    strings = set(MEMORY_TOKENS)
    if tokenizer is not None:
        strings.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values())
        strings.update(getattr(tokenizer, "all_special_tokens", ()))
    alternatives = [re.escape(s) for s in sorted((s for s in strings if s.strip()), key=len, reverse=True)]
    pattern = re.compile("|".join(alternatives + [_MARKER]))
    if tokenizer is not None:
        setattr(tokenizer, _CACHE_ATTR, (size, pattern))
    return pattern


def _defang(token: str) -> str:
    if len(token) >= 2 and token[0] == "<" and token[-1] == ">":
        return "\u2039" + token[1:-1] + "\u203a"  # <recall> -> ‹recall›: readable, never a token
    return token[0] + "\u2060" + token[1:]  # a word joiner splits e.g. [INST]


def neutralize(text: str, tokenizer=None) -> str:
    """``text`` with every special-token string (the memory tokens, the tokenizer's added and
    special tokens, chat-template markers like ``<|im_end|>``) made plain text: ``<recall>``
    becomes ``‹recall›``. Tokenizers match such strings inside ordinary text, so a chat message
    or memory containing them would otherwise become a real ``<recall>`` or end-of-turn in
    training and recall. Idempotent."""
    return _reserved(tokenizer).sub(lambda m: _defang(m.group()), text)


# The prompt format for a tokenizer without a chat template (a base model): one line per turn,
# the role's name, a colon and the text; the assistant's turn is opened with "Assistant: ".
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
_PLAIN_NOTED = set()


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def plain_chat_text(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """``messages`` in the plain role-prefixed format (``PLAIN_ROLES``); an empty system
    message is left out."""
    lines = [f"{PLAIN_ROLES.get(m['role'], str(m['role']).title())}: {m['content']}" for m in messages
             if m.get("content") or m["role"] != "system"]
    text = "".join(line + "\n" for line in lines)
    return text + f"{PLAIN_ROLES['assistant']}: " if add_generation_prompt else text


def safe_chat_template(tokenizer, messages: Sequence[dict], **kwargs) -> str:
    """The prompt for ``messages`` whose contents are neutralized (the only special tokens in it
    are the template's own): the tokenizer's chat template, or, when it has none, the plain
    role-prefixed format (``plain_chat_text``; said once in the log). Every prompt the project
    formats comes through here. A template that refuses a system turn gets the messages without
    an empty one (the empty system message only keeps templates from inserting a default)."""
    clean = [{**m, "content": neutralize(m["content"], tokenizer)} if isinstance(m.get("content"), str) else m
             for m in messages]
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if name not in _PLAIN_NOTED:
            _PLAIN_NOTED.add(name)
            logger.info("%s has no chat template: prompts use the plain format ('User: ...', 'Assistant: ...')", name)
        return plain_chat_text(clean, kwargs.get("add_generation_prompt", False))
    try:
        return tokenizer.apply_chat_template(clean, tokenize=False, **kwargs)
    except Exception:  # jinja2's TemplateError (raise_exception in the template), e.g. "roles must alternate"
        without = [m for m in clean if not (m["role"] == "system" and not m.get("content"))]
        if len(without) == len(clean):
            raise
        return tokenizer.apply_chat_template(without, tokenize=False, **kwargs)


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn: the chat template's own marker, read from a
    rendered conversation (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``, or
    ``</s>`` for templates that end turns with EOS), else EOS. Step 2's answers end with it
    and the recall loop stops at it."""
    if has_chat_template(tokenizer):
        marker = "zq9 answer zq9"
        text = safe_chat_template(tokenizer, [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}])
        after = text[text.rfind(marker) + len(marker):] if marker in text else ""
        ids = tokenizer(after.lstrip(" "), add_special_tokens=False)["input_ids"] if after.strip() else []
        special = set(getattr(tokenizer, "all_special_ids", ())) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        if ids and ids[0] in special:
            return int(ids[0])
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')}: no chat template end-of-turn token "
                         "and no eos_token: cannot tell where an answer ends")
    return int(tokenizer.eos_token_id)


def stop_ids(tokenizer) -> List[int]:
    """Token ids that end generation: EOS and the end-of-turn token."""
    ids = {end_of_turn_id(tokenizer)}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


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
