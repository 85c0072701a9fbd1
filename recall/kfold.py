"""K-fold cross-validation for step 1, stratified by memory.

Each memory's own text is always a training cue; its other cues (source message,
generated questions) are spread over the K folds, starting at a random fold per
memory so folds stay balanced. So every memory keeps cues in training and every
held-out cue asks for a memory the model has seen (the *seen-memory* setting).

One text can be a cue of several memories: a user message that states two facts is the
source cue of both ("I live with Tiago now. Our new flat is on the ground floor."). Copies
of one text (compared by ``cue_key``) share a fold, so a held-out text was never trained
toward another of its memories, and either memory is a right answer to it
(``with_positives``; ``RecallMemoryTrainer.evaluate`` counts a hit on any of them and
reports the single-target ``strict_*`` figures next to it). A cue is ranked among its own
user's memories, as the recall loop searches.

``holdout_memories`` separately removes whole memories from training while keeping
them in the bank: the *unseen-memory* setting, as between two retraining cycles.
"""
from __future__ import annotations

import random
import statistics
from typing import Callable, Dict, List, Optional, Sequence, Set

ALWAYS_TRAIN = -1
ALWAYS_TRAIN_KINDS = ("text", "context", "abstain")  # memory texts, unlabelled texts, "no memory" examples


def cue_key(text: str) -> str:
    """Copies of one cue text compare equal: case and whitespace do not count."""
    return " ".join(text.lower().split())


def stratified_folds(targets: Sequence[int], kinds: Sequence[str], k: int, seed: int = 0,
                     texts: Optional[Sequence[str]] = None) -> List[int]:
    """Fold id per cue (0..k-1), or ``ALWAYS_TRAIN`` for memory-text cues, unlabelled texts and
    "no memory" examples. With ``texts``, the copies of one text share a fold (the first copy's),
    and a text that is always trained anywhere (a memory's text, or a chat turn the teacher labels
    as an unlabelled text, which a source cue often is) is never held out."""
    if k < 2:
        raise ValueError(f"k_folds must be >= 2 for cross-validation, got {k}")
    rng = random.Random(seed)
    keys = [cue_key(t) for t in texts] if texts is not None else [str(i) for i in range(len(targets))]
    always = {key for key, kind in zip(keys, kinds) if kind in ALWAYS_TRAIN_KINDS}
    by_memory: Dict[int, List[int]] = {}
    for i, (t, kind) in enumerate(zip(targets, kinds)):
        if kind not in ALWAYS_TRAIN_KINDS and keys[i] not in always:
            by_memory.setdefault(t, []).append(i)
    folds = [ALWAYS_TRAIN] * len(targets)
    fold_of: Dict[str, int] = {}
    for memory in sorted(by_memory):
        cues = by_memory[memory]
        rng.shuffle(cues)
        offset = rng.randrange(k)
        j = 0
        for i in cues:
            if keys[i] not in fold_of:
                fold_of[keys[i]] = (offset + j) % k
                j += 1
            folds[i] = fold_of[keys[i]]
    return folds


def with_positives(data: Sequence[dict], n_rows: int) -> None:
    """Adds ``positives`` to each labelled item (target in ``0..n_rows-1``): every row of the same
    ``user`` that the same text (``cue_key`` of ``raw``, else ``text``) is a labelled cue of.
    ("What is my name?" is a cue of two users' names; each user's search sees only their own.)"""
    def key(d):
        return d.get("user"), cue_key(d.get("raw", d["text"]))

    rows: Dict[tuple, Set[int]] = {}
    for d in data:
        if 0 <= d["target"] < n_rows:
            rows.setdefault(key(d), set()).add(d["target"])
    for d in data:
        if 0 <= d["target"] < n_rows:
            d["positives"] = sorted(rows[key(d)])


def holdout_memories(targets: Sequence[int], fraction: float, seed: int = 0) -> Set[int]:
    memories = sorted(set(targets))
    n = max(1, round(len(memories) * fraction)) if fraction > 0 else 0
    return set(random.Random(seed).sample(memories, n))


def summarise(per_fold: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Mean and (population) std of every metric over folds."""
    out: Dict[str, float] = {}
    for key in per_fold[0]:
        values = [m[key] for m in per_fold]
        if not all(isinstance(v, (int, float)) for v in values):
            continue
        out[f"{key}_mean"] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.pstdev(values)
    return out


def cross_validate(data: Sequence[dict], k: int, train_and_eval: Callable[[list, list, int], Dict[str, float]],
                   seed: int = 0) -> Dict[str, object]:
    """Train on K-1 folds, evaluate on the held-out one, for each fold.

    ``data`` items carry ``target`` and ``kind``; ``train_and_eval(train, held_out, fold)``
    trains a fresh model and returns held-out metrics."""
    folds = stratified_folds([d["target"] for d in data], [d["kind"] for d in data], k, seed,
                             [d.get("raw", d["text"]) for d in data])
    per_fold = []
    for fold in range(k):
        train = [d for d, f in zip(data, folds) if f != fold]
        held_out = [d for d, f in zip(data, folds) if f == fold]
        if not held_out:
            continue
        per_fold.append(train_and_eval(train, held_out, fold))
    if not per_fold:
        raise ValueError("no cue could be held out: every memory has only its own text as a cue")
    misses = [m for fold in per_fold for m in fold.get("misses", ())]
    per_fold = [{k: v for k, v in fold.items() if k != "misses"} for fold in per_fold]
    return {"k": k, "per_fold": per_fold, **summarise(per_fold), **({"misses": misses} if misses else {})}
