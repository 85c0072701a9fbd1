"""Process-group helpers for ``deepspeed --num_gpus N run_training.py`` / ``torchrun``.

The pipeline runs on every rank. Rank 0 alone does what writes shared state (extraction,
cue generation, the memory DB, reports, publishing); the other ranks wait at barriers and
then read what it wrote. Training is data-parallel on every rank through the HF Trainer.
Without a launcher (one process) every helper is a no-op.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, List


def rank() -> int:
    """Global rank from the launcher's environment (valid before the group exists)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main() -> bool:
    return rank() <= 0


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if world_size() > 1 and _group_ready():
        import torch.distributed as dist

        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if world_size() <= 1 or not _group_ready():
        return value
    import torch.distributed as dist

    box: List[Any] = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. to fill a cache), then the others."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def zero3_partitioned(params) -> bool:
    """Are these parameters partitioned by DeepSpeed ZeRO-3 (``ds_id`` attribute)?"""
    return any(hasattr(p, "ds_id") for p in params)


@contextlib.contextmanager
def without_zero3_init():
    """Load models fully (not partitioned at load time) even when a ZeRO-3 config is active:
    the pipeline copies the base model for every training, and DeepSpeed partitions each
    copy when its Trainer starts."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:
        yield
        return
    ref = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds.set_hf_deepspeed_config(config)


def init_process_group(deepspeed: bool) -> None:
    """Start the process group under a launcher (``world_size() > 1``) as accelerate's shared
    state, so every ``TrainingArguments`` can reuse it (``use_configured_state``).

    Why not let ``TrainingArguments`` do it: with transformers 5.24 / accelerate 1.15 on a
    machine without CUDA, the DeepSpeed path starts accelerate with no backend, which then
    reports one process ("train_batch_size 2 != 2 * 1 * 2" under ``deepspeed --num_gpus 2``)."""
    if world_size() <= 1:
        return
    import torch
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # TrainingArguments made one with no backend
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend=backend)
    finally:
        if deepspeed:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


def prepare_deepspeed_args(args) -> None:
    """Make ``args`` use the process group of ``init_process_group`` and fill the DeepSpeed
    config's ``"auto"`` batch sizes again, now with the real world size (``__post_init__``
    filled them before any process group existed, i.e. with world size 1)."""
    if not getattr(args, "deepspeed", None) or world_size() <= 1:
        return
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    init_process_group(True)  # each new TrainingArguments re-makes accelerate's state without a backend
    args.accelerator_config.use_configured_state = True
    _ = args.device  # the distributed state, so args.world_size is right
    if args.world_size != world_size():
        raise RuntimeError(f"DeepSpeed: TrainingArguments see {args.world_size} processes, the launcher {world_size()}")
    args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)
    args.hf_deepspeed_config.trainer_config_process(args)
    args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)  # what the Trainer hands on
