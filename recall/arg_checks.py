"""One-line errors for numeric options: a negative, zero, NaN or infinite value that would only
fail (or silently do nothing) deep inside training is refused when the arguments are built."""
from __future__ import annotations

import math
from typing import Iterable

# TrainingArguments fields both trainers read, and the bound each needs
TRAINING_POSITIVE = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps")
TRAINING_NON_NEGATIVE = ("num_train_epochs", "weight_decay", "warmup_steps", "max_grad_norm")


def check_numbers(obj, positive: Iterable[str] = (), non_negative: Iterable[str] = (), prefix: str = "") -> None:
    """Raise ``ValueError("<prefix><name>: expected ... , got ...")`` for the first bad field."""
    for names, bound, ok in ((positive, "> 0", lambda v: v > 0), (non_negative, ">= 0", lambda v: v >= 0)):
        for name in names:
            value = getattr(obj, name, None)
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value) or not ok(value):
                raise ValueError(f"{prefix}{name}: expected a finite number {bound}, got {value!r}")


def check_training_numbers(args, prefix: str = "") -> None:
    check_numbers(args, TRAINING_POSITIVE, TRAINING_NON_NEGATIVE, prefix)
    if getattr(args, "num_train_epochs", 1) == 0 and getattr(args, "max_steps", -1) <= 0:
        raise ValueError(f"{prefix}num_train_epochs: expected > 0 (or max_steps > 0), got 0")
