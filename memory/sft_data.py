"""SFT data for step 2, so memory decoding does not cost the model its chat ability.

Sources, all reduced to ``SFTExample(prompt, answer)``:
- ``--sft_data``: a JSONL file (read here, a bad line named by its number), or anything
  Hugging Face ``datasets`` loads (a Parquet/CSV/JSON file, a directory of them, a dataset saved
  with ``save_to_disk``, or a hub id where a hub is reachable), its ``train`` split; each
  example in any of the usual shapes: ``{"messages": [{"role", "content"}, ...]}`` (the last
  assistant turn is the answer, the last user turn before it the prompt), ``{"instruction",
  "input"?, "output"}`` or ``{"prompt", "completion"}`` (TRL's conversational and
  prompt-completion formats);
- by default, **self-distilled** data: the base model's own greedy answers to the
  bundled prompts (``memory/data/general_prompts.json``), generated once and cached by
  model identity + prompts + settings. Training on the model's own answers teaches
  nothing new, so it anchors the model to its own distribution;
- the assistant turns of the user's chat sessions (prompt = the user turn before).

``memory/data/heldout_prompts.json`` is never trained on: ``forgetting`` is measured on it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from memory.fileio import atomic_write_json
from memory.token_manager import safe_chat_template, stop_ids

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
GENERAL_PROMPTS = DATA_DIR / "general_prompts.json"
HELDOUT_PROMPTS = DATA_DIR / "heldout_prompts.json"
CALIBRATION_PROMPTS = DATA_DIR / "calibration_prompts.json"
ABSTENTION_PROMPTS = DATA_DIR / "abstention_prompts.json"
SMALL_TALK_PROMPTS = DATA_DIR / "small_talk_prompts.json"
DISTILL_VERSION = 1


class SFTFormatError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class SFTExample:
    prompt: str
    answer: str
    source: str = ""


def read_prompts(path: Path = GENERAL_PROMPTS) -> List[str]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SFTFormatError(f"{path}: not a JSON file ({exc})") from exc
    if not isinstance(data, list) or not all(isinstance(p, str) and p.strip() for p in data):
        raise SFTFormatError(f"{path}: expected a JSON list of non-empty strings")
    return data


def abstention_prompts(path: Path = GENERAL_PROMPTS,
                       extra: Union[Path, Sequence[Path], None] = (ABSTENTION_PROMPTS, SMALL_TALK_PROMPTS)) -> List[str]:
    """Step 1's "no memory" examples (``--abstention``): half of the general prompts (even
    positions), ``abstention_prompts.json`` (309 everyday requests, two thirds in the first
    person: "I want to start running again, how should I ease into it?") and
    ``small_talk_prompts.json`` (168 greetings, thanks, reactions and remarks on the assistant or
    the user's mood: "hey how r u", "ok that makes sense", "ugh mondays"), in a fixed shuffled
    order so that the first few, all a small bank takes, have every style. The other half of
    the general prompts calibrates the recall threshold, which must not see texts step 1
    trained on."""
    prompts = read_prompts(path)[0::2]
    if extra is None:
        return prompts
    for extra_path in ([extra] if isinstance(extra, (str, Path)) else extra):
        prompts += read_prompts(extra_path)
    random.Random(0).shuffle(prompts)
    return prompts


def calibration_prompts(path: Path = GENERAL_PROMPTS, extra: Optional[Path] = CALIBRATION_PROMPTS) -> List[str]:
    """The unrelated sample of the recall threshold's calibration, never trained on: the other
    half of the general prompts (odd positions) and ``calibration_prompts.json`` (395 prompts
    over 40 topics, a quarter in the first person, written by another hand than the held-out
    prompts ``evaluate.py`` measures false recall on)."""
    return read_prompts(path)[1::2] + (read_prompts(extra) if extra is not None else [])


def _from_messages(messages, where: str) -> SFTExample:
    if not isinstance(messages, list) or not messages:
        raise SFTFormatError(f"{where}.messages: expected a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise SFTFormatError(f"{where}.messages[{i}]: expected {{'role': str, 'content': str}}")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise SFTFormatError(f"{where}.messages: no assistant turn")
    user = next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), None)
    if user is None:
        raise SFTFormatError(f"{where}.messages: no user turn before the last assistant turn")
    return SFTExample(user, messages[last]["content"])


def parse_sft_record(record, where: str) -> SFTExample:
    if not isinstance(record, dict):
        raise SFTFormatError(f"{where}: expected a JSON object")
    if "messages" in record:
        ex = _from_messages(record["messages"], where)
    elif "instruction" in record or "output" in record:
        for field in ("instruction", "output"):
            if not isinstance(record.get(field), str):
                raise SFTFormatError(f"{where}.{field}: expected a string")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise SFTFormatError(f"{where}.input: expected a string")
        ex = SFTExample(f"{record['instruction']}\n\n{extra}".strip(), record["output"])
    elif "prompt" in record or "completion" in record:
        for field in ("prompt", "completion"):
            if not isinstance(record.get(field), str):
                raise SFTFormatError(f"{where}.{field}: expected a string")
        ex = SFTExample(record["prompt"], record["completion"])
    else:
        raise SFTFormatError(f"{where}: expected 'messages', 'instruction'/'output' or 'prompt'/'completion'")
    if not ex.prompt.strip() or not ex.answer.strip():
        raise SFTFormatError(f"{where}: empty prompt or answer")
    return dataclasses.replace(ex, source=where)


def read_sft_data(source: str) -> List[SFTExample]:
    """``--sft_data``: a ``.jsonl`` file (``read_sft_jsonl``) or a ``datasets`` source (see the
    module docstring); every example parsed, the first bad one raising with its row."""
    path = Path(source)
    if path.suffix == ".jsonl" and not path.is_dir():
        return read_sft_jsonl(path)
    # imported here: the datasets package is only needed for this input
    import datasets

    try:
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():  # save_to_disk
            data = datasets.load_from_disk(str(path))
        elif path.is_file():
            kind = {".parquet": "parquet", ".csv": "csv", ".json": "json"}.get(path.suffix)
            if kind is None:
                raise SFTFormatError(f"--sft_data: {path}: expected .jsonl, .json, .parquet or .csv")
            data = datasets.load_dataset(kind, data_files=str(path))
        else:
            data = datasets.load_dataset(str(source))
    except SFTFormatError:
        raise
    except Exception as exc:  # datasets raises many types (missing files, no hub, bad schema)
        raise SFTFormatError(f"--sft_data: {source}: cannot be loaded by datasets: {exc}") from exc
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise SFTFormatError(f"--sft_data: {source}: no 'train' split (has {sorted(data)})")
        data = data["train"]
    out = [parse_sft_record(dict(row), f"{source}[{i}]") for i, row in enumerate(data)]
    if not out:
        raise SFTFormatError(f"{source}: no examples")
    return out


def read_sft_jsonl(path) -> List[SFTExample]:
    """Every line of a JSONL file as an ``SFTExample``; the first bad line raises with its number."""
    file = Path(path)
    if not file.is_file():
        raise SFTFormatError(f"--sft_data: file not found: {file}")
    out = []
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise SFTFormatError(f"{file}: not UTF-8: {exc}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SFTFormatError(f"{file}:{n}: not valid JSON: {exc.msg}") from exc
        out.append(parse_sft_record(record, f"{file}:{n}"))
    if not out:
        raise SFTFormatError(f"{file}: no examples")
    return out


def chat_prompt(tokenizer, prompt: str) -> str:
    """A user turn under the chat template, ready for the assistant's answer. An empty
    system message keeps templates (SmolLM2's) from inserting their default one."""
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": prompt}]
    return safe_chat_template(tokenizer, messages, add_generation_prompt=True)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 16,
                   autocast_dtype=None) -> List[str]:
    """The model's greedy answers (left-padded batches, sorted by length)."""
    from recall.get_text_embedding import autocast

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: List[Optional[str]] = [None] * len(prompts)
    eos = stop_ids(tokenizer)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([chat_prompt(tokenizer, prompts[i]) for i in idx], return_tensors="pt", padding=True,
                        padding_side="left", add_special_tokens=False).to(device)
        with autocast(device, autocast_dtype):
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)
        for i, seq in zip(idx, gen[:, enc["input_ids"].shape[1]:]):
            out[i] = tokenizer.decode(seq, skip_special_tokens=True).strip()
    return out  # type: ignore[return-value]


def self_distilled(model, tokenizer, identity: str, cache_dir: Path, prompts_path: Path = GENERAL_PROMPTS,
                   max_new_tokens: int = 64, autocast_dtype=None) -> List[SFTExample]:
    """The base model's greedy answers to the bundled prompts, cached on disk (atomic
    write) under a key of model identity, prompts and settings."""
    prompts = read_prompts(prompts_path)
    key = hashlib.sha256(json.dumps([DISTILL_VERSION, identity, prompts, max_new_tokens]).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"self_distilled-{key}.json"
    if cache.is_file():
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
            return [SFTExample(d["prompt"], d["answer"], "self-distilled") for d in data]
        except (ValueError, KeyError, TypeError):
            logger.warning("%s: unreadable cache, regenerating", cache)
    logger.info("self-distilling %d prompts with the base model (once; cached in %s)", len(prompts), cache)
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, autocast_dtype=autocast_dtype)
    data = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers) if a]
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache, data)
    return [SFTExample(d["prompt"], d["answer"], "self-distilled") for d in data]


def chat_session_examples(sessions, max_chars: int = 600) -> List[SFTExample]:
    """(user turn, assistant reply) pairs from the chat sessions."""
    out = []
    for s in sessions:
        msgs = s.messages
        for prev, cur in zip(msgs, msgs[1:]):
            if prev.role == "user" and cur.role == "assistant" and cur.content.strip() and len(cur.content) <= max_chars:
                out.append(SFTExample(prev.content, cur.content, f"session:{s.session_id}"))
    return out
