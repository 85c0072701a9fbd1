"""Step 2 + step 4 + the recall loop, end to end on the embedded default model.

    python -m bench.memory_decoding                 # whole default pipeline, then evaluation
    python -m bench.memory_decoding --throughput_only
    python -m bench.memory_decoding --from_step1 WORK -- --decode_mix 2:1:2   # step 2 variants
    python -m bench.memory_decoding --json R.json --no_throughput -- --adapter_scope recall  # a variant pipeline
    python -m bench.memory_decoding --no_throughput --questions examples/test/questions.json \
        --json bench/results/memory_decoding_test_set.json -- --chats_dir examples/test/chats   # the test set

1. runs ``python run_training.py`` (the default configuration) in a fresh work directory
   and records the wall time per stage;
2. evaluates the published version on ``examples/questions.json`` (``--questions``): the answer a
   ``chat.py`` user reads next to the RAG peer and no memory, false recalls on general prompts,
   retrieval (trained
   ``<recall>`` vs the untrained base and MiniLM, same run), ``decode_exact_match``,
   ``answer_hit_rate``, how often the model asks unprompted, and forgetting on held-out prompts;
3. measures step-2 training throughput (tokens/s) of the default configuration (the
   activated adapter) and of the adapter at every position against a naive one (fp32, every
   sample padded to ``max_length``, LM head over every position) on the same samples in the
   same process.

Writes ``bench/results/memory_decoding.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "memory_decoding.json"


def run_pipeline(work: Path, extra) -> dict:
    from memory.config import parse_args
    from memory.training_service import MemoryTrainingService

    argv = ["--output_dir", str(work), "--disable_tqdm", "true", *extra]
    model_args, args, train_args = parse_args(argv)
    service = MemoryTrainingService(model_args, args, train_args)
    started = time.perf_counter()
    try:
        summary = service.run_training()
    finally:
        service.close()
    return {"seconds": time.perf_counter() - started, "stage_seconds": summary.stage_seconds,
            "memories_imported": summary.memories_imported, "version": summary.version, "decoding": summary.decoding,
            "lines": summary.lines()}


def run_from_step1(work: Path, extra) -> dict:
    """Step 2 + publish on the newest step-1 run of an existing work directory (for comparing
    step-2 variants on the same step-1 adapter)."""
    from memory.config import parse_args
    from memory.training_service import MemoryTrainingService

    model_args, args, train_args = parse_args(["--output_dir", str(work), "--disable_tqdm", "true", *extra])
    service = MemoryTrainingService(model_args, args, train_args)
    run_dir = sorted(work.glob("runs/*/recall/metrics.json"))[-1].parent.parent
    started = time.perf_counter()
    try:
        sessions = service.load_chat_sessions().sessions
        result = service.train_memory_decoding(sessions, run_dir)
        version = service.publish(result, run_dir, None)
    finally:
        service.close()
    return {"seconds": time.perf_counter() - started, "version": str(version), "decoding": result.metrics,
            "stage_seconds": {},
            "lines": [f"step 2 on {run_dir}: {json.dumps({k: v for k, v in result.metrics.items() if k != 'decode_failures'})}"]}


def throughput(steps: int = 4, batch_size: int = 8) -> dict:
    """tokens/s of real (non-pad) tokens on the same samples, same process: the naive
    configuration, the all-positions adapter, the activated adapter (the default), and the activated
    adapter through PEFT's own masked forward (the lean-forward lever).

    The samples are the kinds the activated adapter trains (memory and sandwich samples; pure
    SFT samples never reach it), so all four see the same tokens."""
    from memory.decoding_step import SampleBuilder
    from memory.sft_data import SFTExample, read_prompts
    from memory.token_manager import MEMORY_PAD_TOKEN, add_memory_tokens
    from recall.model_loading import load_model_and_tokenizer
    from recall.text_memory_train import DecodingCollator, IGNORE, MemoryDecodingArguments, build_decoder_model

    loaded = load_model_and_tokenizer(precision="fp32")
    ids = add_memory_tokens(loaded.model, loaded.tokenizer)
    facts = [json.loads(line)["text"] for line in (ROOT / "examples" / "memories.jsonl").read_text().splitlines()
             if line.strip()]
    prompts = read_prompts()
    sft = [SFTExample(p, "Here is a short answer to that question, in a few plain words. " * 3) for p in prompts]
    builder = SampleBuilder(loaded.tokenizer, facts, [[f"Tell me about {f.split()[-1]}"] for f in facts], sft, 192)
    samples = [x for x in builder.epoch(0, random.Random(0)) if x["kind"] != "sft"]
    bank = torch.randn(len(facts), loaded.model.config.hidden_size)
    out = {}
    configs = (("naive: pad to max_length (192), LM head on every position", "all", 192, True),
               ("adapter at every position: dynamic padding, LM head on labelled positions", "all", None, True),
               ("activated adapter (default): context without gradient, adapter from <recall> on", "recall", None,
                True),
               ("activated adapter through PEFT's masked aLoRA forward", "recall", None, False))
    for name, scope, pad_to, lean in configs:
        import copy

        args = MemoryDecodingArguments(output_dir="/tmp/unused", report_to="none", adapter_scope=scope,
                                       lora_target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
                                       if scope == "recall" else MemoryDecodingArguments.lora_target_modules)
        model = build_decoder_model(copy.deepcopy(loaded.model), ids, args, memory_dim=loaded.model.config.hidden_size)
        if not lean:  # back to PEFT's own LoRA forward (build_decoder_model installs the lean one)
            for m in model.modules():
                m.__dict__.pop("forward", None)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        collate = DecodingCollator(loaded.tokenizer.pad_token_id, bank, ids[MEMORY_PAD_TOKEN], pad_to=pad_to)
        batches = [collate(samples[i * batch_size:(i + 1) * batch_size]) for i in range(steps + 1)]
        real = 0
        for i, batch in enumerate(batches):
            if i == 1:  # the first step warms up
                start = time.perf_counter()
            if pad_to is None:
                loss = model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                             batch.get("memory_vectors"))["loss"]  # the parts are detached
            else:
                hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch.get("memory_vectors"))
                logits = model.logits(hidden[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 1:
                real += int(batch["attention_mask"].sum())
        seconds = time.perf_counter() - start
        out[name] = {"tokens_per_second": real / seconds, "seconds": seconds, "real_tokens": real}
    names = list(out)
    out["speedup"] = out[names[2]]["tokens_per_second"] / out[names[0]]["tokens_per_second"]
    out["speedup_all_positions"] = out[names[1]]["tokens_per_second"] / out[names[0]]["tokens_per_second"]
    out["speedup_lean_forward"] = out[names[2]]["tokens_per_second"] / out[names[3]]["tokens_per_second"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--throughput_only", action="store_true")
    ap.add_argument("--work", default=None, help="work directory (default: a fresh temp dir)")
    ap.add_argument("--from_step1", default=None, help="run only step 2 + publish on this work directory")
    ap.add_argument("--json", default=None, help="where to write the results (default: bench/results/"
                                                 "memory_decoding.json, or memory_decoding_variant.json with --from_step1)")
    ap.add_argument("--no_throughput", action="store_true", help="skip the default-vs-naive throughput check")
    ap.add_argument("--questions", default=str(ROOT / "examples" / "questions.json"),
                    help="questions the published version is evaluated on (with -- --chats_dir DIR for other chats)")
    ap.add_argument("--general_prompts", default=None,
                    help="general prompts for the false-recall figure (default: memory/data/heldout_prompts.json)")
    ap.add_argument("pipeline_args", nargs="*", help="extra run_training.py flags (after --)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from bench.speed import cpu_description

    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_description()}, {torch.get_num_threads()} threads"}
    if not args.throughput_only:
        from memory.evaluation import evaluate_version, format_table

        if args.from_step1:
            result["pipeline"] = run_from_step1(Path(args.from_step1), args.pipeline_args)
        else:
            work = Path(args.work or tempfile.mkdtemp(prefix="bench-decoding-"))
            result["pipeline"] = run_pipeline(work, args.pipeline_args)
        from memory.sft_data import read_prompts

        prompts = read_prompts(Path(args.general_prompts)) if args.general_prompts else None
        report = evaluate_version(result["pipeline"]["version"], args.questions, precision="fp32",
                                  heldout_prompts=prompts, heldout_source=args.general_prompts)
        result["evaluation"] = report
        print("\n".join(result["pipeline"]["lines"]))
        print(format_table(report))
    if not args.from_step1 and not args.no_throughput:
        result["throughput"] = throughput()
        for name, m in result["throughput"].items():
            if isinstance(m, dict):
                print(f"{name}: {m['tokens_per_second']:.0f} tokens/s")
        print(f"speed-up over naive: {result['throughput']['speedup']:.2f}x (activated), "
              f"{result['throughput']['speedup_all_positions']:.2f}x (adapter at every position); lean aLoRA "
              f"forward vs PEFT's: {result['throughput']['speedup_lean_forward']:.2f}x")
    out = RESULTS if not args.from_step1 else RESULTS.with_name("memory_decoding_variant.json")
    out = Path(args.json) if args.json else out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
