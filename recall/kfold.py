"""K-fold cross-validation for step 1, stratified by memory.

Each memory's own text is always a training cue; its other cues (source message,
generated questions) are spread over the K folds, starting at a random fold per
memory so folds stay balanced. So every memory keeps cues in training and every
held-out cue asks for a memory the model has seen (the *seen-memory* setting).

``holdout_memories`` separately removes whole memories from training while keeping
them in the bank: the *unseen-memory* setting, as between two retraining cycles.
"""
from __future__ import annotations

import random
import statistics
from typing import Callable, Dict, List, Sequence, Set

ALWAYS_TRAIN = -1
ALWAYS_TRAIN_KINDS = ("text", "context", "abstain")  # memory texts, unlabelled texts, "no memory" examples


def stratified_folds(targets: Sequence[int], kinds: Sequence[str], k: int, seed: int = 0) -> List[int]:
    """Fold id per cue (0..k-1), or ``ALWAYS_TRAIN`` for memory-text cues, unlabelled texts and
    "no memory" examples."""
    if k < 2:
        raise ValueError(f"k_folds must be >= 2 for cross-validation, got {k}")
    rng = random.Random(seed)
    by_memory: Dict[int, List[int]] = {}
    for i, (t, kind) in enumerate(zip(targets, kinds)):
        if kind not in ALWAYS_TRAIN_KINDS:
            by_memory.setdefault(t, []).append(i)
    folds = [ALWAYS_TRAIN] * len(targets)
    for memory in sorted(by_memory):
        cues = by_memory[memory]
        rng.shuffle(cues)
        offset = rng.randrange(k)
        for j, i in enumerate(cues):
            folds[i] = (offset + j) % k
    return folds


def holdout_memories(targets: Sequence[int], fraction: float, seed: int = 0) -> Set[int]:
    memories = sorted(set(targets))
    n = max(1, round(len(memories) * fraction)) if fraction > 0 else 0
    return set(random.Random(seed).sample(memories, n))


def summarise(per_fold: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Mean and (population) std of every metric over folds."""
    out: Dict[str, float] = {}
    for key in per_fold[0]:
        values = [m[key] for m in per_fold]
        out[f"{key}_mean"] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.pstdev(values)
    return out


def cross_validate(data: Sequence[dict], k: int, train_and_eval: Callable[[list, list, int], Dict[str, float]],
                   seed: int = 0) -> Dict[str, object]:
    """Train on K-1 folds, evaluate on the held-out one, for each fold.

    ``data`` items carry ``target`` and ``kind``; ``train_and_eval(train, held_out, fold)``
    trains a fresh model and returns held-out metrics."""
    folds = stratified_folds([d["target"] for d in data], [d["kind"] for d in data], k, seed)
    per_fold = []
    for fold in range(k):
        train = [d for d, f in zip(data, folds) if f != fold]
        held_out = [d for d, f in zip(data, folds) if f == fold]
        if not held_out:
            continue
        per_fold.append(train_and_eval(train, held_out, fold))
    if not per_fold:
        raise ValueError("no cue could be held out: every memory has only its own text as a cue")
    return {"k": k, "per_fold": per_fold, **summarise(per_fold)}
