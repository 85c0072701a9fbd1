"""``deepspeed --num_gpus 2 run_training.py --deepspeed ds_configs/...``: two real CPU
processes (gloo/shm), the tiny model, ZeRO-2 and ZeRO-3. The published version must match a
single-process run's: the same memories active, a loadable model, trained (non-zero) state,
and the published token rows equal to the saved (gathered) ones. A ZeRO-3 run killed after a
checkpoint resumes from it."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import run_training
from memory.publish import MANIFEST, resolve_current
from memory.vector_db import MemoryVectorDB

ROOT = Path(__file__).resolve().parents[1]
FACTS = ["The user lives in Porto.", "The user has a dog named Max.", "The user works as a nurse."]


def _flags(tiny_model_dir, tmp_path, out: Path) -> list:
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in [
        ("Say hi.", "Hi there!"), ("Name a colour.", "Blue."), ("Count to three.", "One, two, three.")]) + "\n")
    mem = tmp_path / "m.jsonl"
    mem.write_text("".join(json.dumps({"text": t, "user_id": "alex"}) + "\n" for t in FACTS))
    return ["--model_name_or_path", str(tiny_model_dir), "--chats_dir", "", "--precision", "fp32",
            "--output_dir", str(out), "--num_train_epochs", "2", "--per_device_train_batch_size", "2",
            "--lora_r", "4", "--cue_questions", "1", "--k_folds", "0", "--memories", str(mem), "--sft_data", str(sft),
            "--sft_self_distill", "false", "--decode_epochs", "2", "--decode_min_steps", "0", "--decode_batch_size", "2",
            "--decode_lora_r", "4",
            "--decode_projector_hidden", "32", "--disable_tqdm", "true", "--recall_teacher", "none"]


def _published(out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    current = resolve_current(out / "models")
    with MemoryVectorDB(current / "memory_db") as db:
        snap = sorted(r.text for r in db.records(statuses=("active",)))
    with MemoryVectorDB(out / "memory_db") as db:
        live = sorted(r.text for r in db.records(statuses=("active",)))
    run = Path(json.loads((current / MANIFEST).read_text())["run_dir"])
    recall = load_file(str(run / "recall" / "recall_state.safetensors"))
    decode = load_file(str(run / "decode" / "decoder_state.safetensors"))
    rows = AutoModelForCausalLM.from_pretrained(current).get_input_embeddings().weight.detach()
    return {"snapshot": snap, "live": live, "recall": recall, "decode": decode, "run": run,
            "published_rows": rows[decode["token_rows.token_ids"]].float(), "vocab": rows.shape[0],
            "metrics": json.loads((current / "metrics.json").read_text())}


def _trained(state: dict) -> bool:
    """LoRA B matrices and the token-row delta start at zero: non-zero means they trained."""
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    return bool(lora_b) and all(v.abs().sum() > 0 for v in lora_b) and state["token_rows.delta"].abs().sum() > 0


@pytest.fixture(scope="module")
def singles(tiny_model_dir, tmp_path_factory):
    """One single-process run per adapter scope, made on first use."""
    runs = {}

    def get(scope: str) -> dict:
        if scope not in runs:
            tmp = tmp_path_factory.mktemp(f"single-{scope}")
            assert run_training.main(_flags(tiny_model_dir, tmp, tmp / "out") + ["--adapter_scope", scope]) == 0
            runs[scope] = _published(tmp / "out")
        return runs[scope]

    return get


@pytest.fixture(scope="module")
def single(singles):
    return singles("recall")


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not installed")
@pytest.mark.parametrize("config,scope", [("zero2.json", "recall"), ("zero3.json", "recall"),
                                          ("zero3_offload.json", "recall"), ("zero3.json", "all")])
def test_two_process_deepspeed_run_publishes_what_one_process_trains(config, scope, tiny_model_dir, tmp_path, singles):
    single = singles(scope)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(29500 + (os.getpid() % 1000)), "run_training.py",
           "--deepspeed", f"ds_configs/{config}", *_flags(tiny_model_dir, tmp_path, out), "--adapter_scope", scope]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert done.stdout.count("published: ") == 1  # rank 0 alone publishes and reports
    multi = _published(out)
    assert multi["snapshot"] == single["snapshot"] == sorted(FACTS)
    assert multi["live"] == single["live"]
    assert multi["metrics"]["decoding"]["train"]["world_size"] == 2
    # the per-epoch decode check ran on every rank (its count is all-reduced) without hanging
    curve = multi["metrics"]["decoding"]["train"]["exact_match_by_epoch"]
    assert len(curve) == round(multi["metrics"]["decoding"]["train"]["epochs_run"]) > 0
    for part in ("recall", "decode"):
        assert set(multi[part]) == set(single[part])  # the same trainable tensors were saved
        assert _trained(multi[part]), f"{config}: {part} state saved empty or untrained"
        for k, v in multi[part].items():
            assert v.shape == single[part][k].shape and torch.isfinite(v.float()).all()
    # the published model holds exactly the saved (gathered) token rows: base rows + trained delta;
    # the embedding was resized for the memory tokens before DeepSpeed partitioned it
    saved = multi["decode"]["token_rows.base_rows"] + multi["decode"]["token_rows.delta"]
    assert torch.allclose(multi["published_rows"], saved, atol=1e-5)
    assert multi["vocab"] == single["vocab"]
    activated = (resolve_current(out / "models") / "memory_adapter" / "adapter_model.safetensors").is_file()
    assert activated == (scope == "recall") and multi["metrics"]["decoding"]["adapter_scope"] == scope
    assert multi["metrics"]["decoding"]["decode_exact_match"] is not None  # decoded through <|memory_pad|>


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not installed")
@pytest.mark.reliability(fault="ZeRO-2, ZeRO-3 and ZeRO-3 offload over 2 processes with the default MiniLM teacher",
                         outcome="the helper model loads whole; the run publishes a loadable version")
@pytest.mark.parametrize("config", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_zero_with_the_default_teacher_publishes(config, tiny_model_dir, tmp_path):
    """The default step 1 loads a helper model (the MiniLM teacher) while a ZeRO config is
    active: under ZeRO-3 it must load whole, outside the partitioning, and every run publish."""
    out = tmp_path / "out"
    flags = _flags(tiny_model_dir, tmp_path, out)
    flags = flags[:flags.index("--recall_teacher")]  # the default teacher (all-MiniLM-L6-v2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(28500 + (os.getpid() % 1000)), "run_training.py",
           "--deepspeed", f"ds_configs/{config}", *flags]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert done.stdout.count("published: ") == 1 and _published(out)["snapshot"] == sorted(FACTS)


@pytest.mark.reliability(fault="Every ZeRO-3 rank killed after step 2's first checkpoint", outcome='resumed from the DeepSpeed checkpoint')
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not installed")
def test_zero3_run_killed_after_a_checkpoint_resumes_from_it(tiny_model_dir, tmp_path, single):
    """Every rank SIGKILLs itself right after step 2's first complete DeepSpeed checkpoint
    (ZeRO-3: per-rank parameter and optimizer shards); the rerun resumes from it."""
    out = tmp_path / "out"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(28500 + (os.getpid() % 1000)), "run_training.py",
           "--deepspeed", "ds_configs/zero3.json", *_flags(tiny_model_dir, tmp_path, out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    crashed = subprocess.run(cmd, cwd=ROOT, env={**env, "RECALL_MEMORY_CRASH_AT": "decode-checkpoint"},
                             capture_output=True, text=True, timeout=600)
    assert crashed.returncode != 0
    checkpoints = list(out.glob("runs/*/decode/checkpoint-*/checkpoint_complete.json"))
    assert len(checkpoints) == 1 and not (out / "models").exists()
    assert list(checkpoints[0].parent.glob("global_step*")), "no DeepSpeed checkpoint shards were written"
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    log = next(out.glob("runs/*/run.log")).read_text()
    assert f"step 3.2: resuming from {checkpoints[0].parent}" in log
    resumed = _published(out)
    assert resumed["snapshot"] == single["snapshot"] and _trained(resumed["decode"])


def test_bad_deepspeed_config_is_reported_before_any_model_loads(tmp_path, capsys):
    assert run_training.main(["--deepspeed", str(tmp_path / "missing.json")]) == 2
    assert "--deepspeed: config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert run_training.main(["--deepspeed", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("config", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_shipped_configs_are_complete(config):
    data = json.loads((ROOT / "ds_configs" / config).read_text())
    zero = data["zero_optimization"]
    assert zero["stage"] in (2, 3) and data["train_micro_batch_size_per_gpu"] == "auto"
    assert data["bf16"]["enabled"] == "auto" and data["gradient_accumulation_steps"] == "auto"
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    if "offload" in config:
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
