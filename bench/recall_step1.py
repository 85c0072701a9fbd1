"""Step 1 (`<recall>` training) on the sample data: K-fold, held-out questions, throughput.

    python -m bench.recall_step1 [--k_folds 5] [--epochs 8] [--json bench/results/recall_step1.json]

Memories are the annotated current facts (`examples/memories.jsonl`, so extraction errors do
not blur the picture); the user turns of `examples/chats` are unlabelled texts for the
teacher's KL term. Reports, in one run:
- K-fold recall@1 / recall@5 / MRR on held-out cues (mean ± std);
- the kept adapter (trained on every cue) on the 49 held-out questions of
  `examples/questions.json`, next to the untrained base model and the MiniLM RAG peer;
- training throughput (tokens/s, forward+backward+step) in fp32 vs bf16 autocast, same batch.
"""
import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from memory.config import MemoryArguments, ModelArguments
from memory.evaluation import evaluate_retrieval
from memory.token_manager import add_memory_tokens
from memory.training_service import MemoryTrainingService
from recall.text_embedding_train import RecallTrainingArguments, build_recall_model


def throughput(loaded, autocast_dtype, batch=8, length=48, steps=2, budget_s=240.0) -> dict:
    """tokens/s of LoRA training steps on the real model (random tokens, fixed shape)."""
    ids = add_memory_tokens(loaded.model, loaded.tokenizer)
    args = RecallTrainingArguments(output_dir="/tmp/unused", lora_target_modules="q_proj,v_proj")
    model = build_recall_model(copy.deepcopy(loaded.model), loaded.tokenizer, args,
                               loaded.model.config.hidden_size, list(ids.values()))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(100, 40000, (batch, length))
    mask = torch.ones_like(x)
    done, start = 0, None
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = model(x, mask).float().pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step >= 1:
            done += 1
            if time.perf_counter() - start > budget_s:
                break
    seconds = time.perf_counter() - start
    return {"tokens_per_s": done * batch * length / seconds, "seconds_per_step": seconds / done, "steps": done}


def training_overrides(pairs) -> dict:
    """``FIELD=VALUE`` strings to ``RecallTrainingArguments`` keyword arguments, typed and checked
    by the same ``HfArgumentParser`` that reads ``run_training.py``'s flags."""
    from transformers import HfArgumentParser

    argv, names = [], []
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE with a RecallTrainingArguments field")
        argv += [f"--{name}", raw]
        names.append(name)
    try:
        (parsed,) = HfArgumentParser(RecallTrainingArguments).parse_args_into_dataclasses(
            args=["--output_dir", "unused", *argv])
    except ValueError as err:  # a name that is no field ("not used by the HfArgumentParser")
        raise SystemExit(f"--set: {err}") from None
    return {name: getattr(parsed, name) for name in names}


def with_sources(memories: str, facts: str, out: Path) -> Path:
    """``memories`` with ``session_id``/``message_index`` of each text's first annotated mention."""
    first = {}
    for fact in json.loads(Path(facts).read_text()):
        first.setdefault(fact["fact"], fact)
    lines = []
    for no, line in enumerate(Path(memories).read_text().splitlines(), 1):
        if line.strip():
            item = json.loads(line)
            if item["text"] not in first:
                raise SystemExit(f"{memories}:{no}: text {item['text']!r} has no annotated mention in {facts}")
            item.update(session_id=first[item["text"]]["session_id"], message_index=first[item["text"]]["message_index"])
            lines.append(json.dumps(item))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k_folds", type=int, default=5)
    ap.add_argument("--epochs", type=float, default=8)
    ap.add_argument("--json", default="bench/results/recall_step1.json")
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--memories", default="examples/memories.jsonl",
                    help="memory entries (JSON lines, as for run_training.py --memories)")
    ap.add_argument("--sources", action="store_true",
                    help="give each memory the chat message it was said in (first mention, from "
                         "examples/expected_facts.json), so step 1 also trains on its source turn")
    ap.add_argument("--embedding_model", default="chat", help="memory vectors: chat | minilm")
    ap.add_argument("--no_throughput", action="store_true")
    ap.add_argument("--cue_questions", type=int, default=MemoryArguments.cue_questions)
    ap.add_argument("--cue_templates", default="true", choices=("true", "false"), help="questions made by rule")
    ap.add_argument("--abstention", default=str(RecallTrainingArguments.abstention).lower(), choices=("true", "false"),
                    help="general prompts train step 1's 'no memory' level")
    ap.add_argument("--vector_distill_weight", type=float, default=0.0,
                    help="distil the teacher's vectors into <recall> (needs --embedding_model minilm)")
    ap.add_argument("--general_prompts", action="store_true", help="bundled prompts as extra unlabelled texts")
    ap.add_argument("--adapter_scope", default=RecallTrainingArguments.adapter_scope,
                    help="where the LoRA acts: recall | all")
    ap.add_argument("--lora_target_modules", default="auto")
    ap.add_argument("--model_name_or_path", default=ModelArguments.model_name_or_path,
                    help="the chat model: HF hub id, local directory, .gguf file, or 'default' (SmolLM2-135M)")
    ap.add_argument("--gguf_file", default=None, help="GGUF file inside --model_name_or_path")
    ap.add_argument("--train_precision", default="auto", choices=("auto", "bf16", "fp32"),
                    help="the trainer's autocast (auto: bf16 where this CPU's bf16 matmuls measure faster)")
    ap.add_argument("--seed", type=int, default=42, help="training seed (cue order, LoRA init, fold split)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="any other RecallTrainingArguments field, e.g. --set distill_weight=3 (repeatable)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-recall-"))
    memories = str(with_sources(args.memories, "examples/expected_facts.json", work / "memories_sources.jsonl")) \
        if args.sources else args.memories
    margs = MemoryArguments(chats_dir="examples/chats", memories=memories, stage="recall",
                            k_folds=args.k_folds, embedding_model=args.embedding_model,
                            cue_questions=args.cue_questions, cue_templates=args.cue_templates == "true",
                            recall_general_prompts=args.general_prompts)
    targs = RecallTrainingArguments(output_dir=str(work), num_train_epochs=args.epochs, seed=args.seed,
                                    vector_distill_weight=args.vector_distill_weight,
                                    abstention=args.abstention == "true",
                                    adapter_scope=args.adapter_scope, lora_target_modules=args.lora_target_modules,
                                    **training_overrides(args.set))
    service = MemoryTrainingService(ModelArguments(model_name_or_path=args.model_name_or_path, gguf_file=args.gguf_file,
                                                   train_precision=args.train_precision), margs, targs)
    start = time.perf_counter()
    sessions = service.load_chat_sessions().sessions
    service.import_memories(margs.memories)
    metrics = service.train_recall_token(sessions)
    train_seconds = time.perf_counter() - start
    loaded = service.loaded
    precision = "bf16 autocast" if service.train_args.bf16 else "fp32"
    service.close()
    from memory.evaluation import find_model_dir
    report = evaluate_retrieval(work, find_model_dir(work), "examples/questions.json", precision="fp32")
    speed = {} if args.no_throughput else {"fp32": throughput(loaded, None),
                                          "bf16_autocast": throughput(loaded, torch.bfloat16, steps=1)}
    k = metrics.get("kfold", {})
    print(f"\nstep 1 on {metrics['memories']} memories, {metrics['cues']} cues, {metrics['unlabelled_texts']} "
          f"unlabelled texts; {train_seconds:.0f}s for cues + K-fold + final training, in {precision}\n")
    if k:
        print(f"{k['k']}-fold held-out cues: recall@1 {k['recall_at_1_mean']:.3f} ± {k['recall_at_1_std']:.3f}, "
              f"recall@5 {k['recall_at_5_mean']:.3f} ± {k['recall_at_5_std']:.3f}, "
              f"MRR {k['mrr_mean']:.3f} ± {k['mrr_std']:.3f}\n")
    print("| held-out questions (49) | recall@1 | recall@5 | MRR |\n|---|---|---|---|")
    for name in ("trained_recall", "untrained_last_token", "minilm_rag"):
        m = report[name]
        print(f"| {name} | {m['recall_at_1']:.3f} | {m['recall_at_5']:.3f} | {m['mrr']:.3f} |")
    print("\n| training precision | tokens/s | s/step |\n|---|---|---|")
    for name, s in speed.items():
        print(f"| {name} | {s['tokens_per_s']:.1f} | {s['seconds_per_step']:.2f} |")
    out = {"options": vars(args), "trained_in": precision, "metrics": metrics, "train_seconds": train_seconds,
           "throughput": speed,
           "questions": {n: {k2: v for k2, v in report[n].items() if k2 != "per_question"}
                         for n in ("trained_recall", "untrained_last_token", "minilm_rag")}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
