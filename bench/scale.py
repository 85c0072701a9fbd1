"""How training and extraction time grow: one training cycle vs the number of memories, and
extraction vs the number of sessions, measured (not extrapolated).

    python -m bench.scale --memories 10,100,1000 --sessions 1,2,4,8,16
    python -m bench.scale --memories 10 --sessions 1,2,4        # minutes

- **Training cycle**: the default pipeline (``MemoryTrainingService.run_training``, stage all,
  all defaults) in a fresh work directory on the first N LoCoMo observation facts (read in
  place, imported with ``--memories`` semantics, no chats): wall time per stage.
- **Extraction**: the pipeline's extractor on the first N sessions of LoCoMo conversation 0
  (each one chat session per speaker side).
The growth order is the log-log slope between consecutive sizes (1.0 = linear).
Writes ``bench/results/scale.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

RESULTS = Path("bench/results/scale.json")


def slopes(points):
    """log-log slopes between consecutive (size, seconds) points."""
    return [round(math.log(t2 / t1) / math.log(n2 / n1), 2) for (n1, t1), (n2, t2) in zip(points, points[1:])
            if t1 > 0 and t2 > 0 and n2 != n1]


def training_cycle(n: int, locomo: str, seed: int = 42) -> dict:
    from bench.memory_decoding import run_pipeline
    from memory.locomo import load_locomo

    facts = [(c.sample_id, f) for c in load_locomo(locomo) for f in c.facts][:n]
    if len(facts) < n:
        raise SystemExit(f"LoCoMo has {len(facts)} observation facts, fewer than {n}")
    work = Path(tempfile.mkdtemp(prefix=f"bench-scale-{n}-"))
    memories = work / "memories.jsonl"
    memories.write_text("".join(json.dumps({"text": f.text, "user_id": sid}) + "\n" for sid, f in facts))
    (work / "no_chats").mkdir()  # N memories and nothing else (the default chats_dir holds the example chats)
    run = run_pipeline(work / "out", ["--memories", str(memories), "--chats_dir", str(work / "no_chats"), "--seed", str(seed)])
    return {"memories": n, "seed": seed, "imported": run["memories_imported"], "seconds": run["seconds"],
            "stage_seconds": run["stage_seconds"], "version": run["version"], **cycle_work(work / "out")}


def cycle_work(out: Path) -> dict:
    """What the cycle trained, from its run directory's metrics: step-1 cues and epochs, step-2
    samples per epoch, epochs run (``decode_stop_at_exact_match`` and ``decode_min_steps`` make
    this depend on the size) and the exact-match share it reached, and step 2's phase timings."""
    run_dir = sorted(out.glob("runs/*/decode/metrics.json"))[-1].parent.parent
    recall = json.loads((run_dir / "recall" / "metrics.json").read_text())
    decode = json.loads((run_dir / "decode" / "metrics.json").read_text())
    from bench.speed import cpu_description

    return {"date": time.strftime("%Y-%m-%d"), "machine": cpu_description(),
            "precision": {"step1": recall.get("precision"), "step2": decode["train"].get("precision")},
            "step1_cues": recall.get("cues"), "step1_epochs": recall.get("final_train_set", {}).get("epoch"),
            "step2_samples_per_epoch": decode["train"].get("samples_per_epoch"),
            "step2_epochs": decode["train"].get("epochs_run"),
            "step2_tokens_per_second": decode["train"].get("tokens_per_second"),
            "decode_exact_match": decode.get("decode_exact_match"),
            "step2_phase_seconds": decode.get("phase_seconds", {})}


def extraction(n_sessions: int, locomo: str) -> dict:
    from memory.config import MemoryArguments, ModelArguments
    from memory.locomo import chat_sessions, load_locomo
    from memory.training_service import MemoryTrainingService

    conv = load_locomo(locomo)[0].limited(n_sessions)
    sessions = chat_sessions(conv)
    from recall.text_embedding_train import RecallTrainingArguments

    work = Path(tempfile.mkdtemp(prefix="bench-scale-extract-"))
    service = MemoryTrainingService(ModelArguments(), MemoryArguments(stage="extract"),
                                    RecallTrainingArguments(output_dir=str(work)))
    try:
        service.loaded  # load the model outside the timing
        started = time.perf_counter()
        result = service.extract_memory_entries(sessions)
        seconds = time.perf_counter() - started
    finally:
        service.close()
    return {"sessions": n_sessions, "chat_sessions": len(sessions), "method": service.args.extraction_method,
            "user_turns": sum(m.role == "user" for s in sessions for m in s.messages),
            "facts": len(result.candidates), "seconds": seconds}


def main(argv=None) -> int:
    from memory.locomo import DEFAULT_PATH

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memories", default="10,100,1000")
    ap.add_argument("--sessions", default="1,2,4,8,16")
    ap.add_argument("--locomo", default=str(DEFAULT_PATH))
    ap.add_argument("--json", default=str(RESULTS))
    ap.add_argument("--seed", type=int, default=42, help="the training seed (run_training.py --seed)")
    args = ap.parse_args(argv)
    out_path = Path(args.json)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    result.setdefault("training", {})
    result.setdefault("extraction", {})
    for n in [int(x) for x in args.sessions.split(",") if x]:
        result["extraction"][str(n)] = extraction(n, args.locomo)
        print(f"extraction, {n} sessions: {result['extraction'][str(n)]['seconds']:.1f}s", flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1) + "\n")
    for n in [int(x) for x in args.memories.split(",") if x]:
        result["training"][str(n)] = training_cycle(n, args.locomo, args.seed)
        print(f"training cycle, {n} memories: {result['training'][str(n)]['seconds']:.0f}s", flush=True)
        out_path.write_text(json.dumps(result, indent=1) + "\n")
    ext = sorted((v["user_turns"], v["seconds"]) for v in result["extraction"].values())
    tr = sorted((v["memories"], v["seconds"]) for v in result["training"].values())
    result["growth"] = {"extraction_vs_user_turns": slopes(ext), "training_vs_memories": slopes(tr)}
    result["date"] = time.strftime("%Y-%m-%d")
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["growth"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
