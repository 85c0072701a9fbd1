"""Recall latency: what a ``<recall>`` costs in generation, against plain decoding.

    python -m bench.recall_latency --version WORK/models/current [--questions 10] [--tokens 48]

On a published version and its own memory DB, one question at a time (batch 1, greedy, KV
cache, the version's precision), in the same process:
- ``hf_generate``: ``model.generate`` on the plain chat prompt, ``--tokens`` new tokens;
- ``loop_plain``: our recall loop on the same prompt (no recall happens);
- ``loop_recall``: the recall loop with ``--force-recall``: the prompt ends in the activation
  phrase and ``<recall>``, so the first step queries the DB, injects the memory vector at
  ``<|memory_pad|>`` and decodes the memory text, then the answer.
Reported: tokens/s of each; the **recall latency** (from the ``<recall>`` state being
available to the first memory token's logits: query projection + DB search + one forward of
the injected pad) and its ratio to a plain decoding step (the median forward of the same run).
Writes ``bench/results/recall_latency.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path("bench/results/recall_latency.json")


class _Clock:
    """Wall times of the engine's forward calls and of its searches (wraps, does not change them)."""

    def __init__(self, engine, search):
        self.forwards, self.search_at, self.after_search = [], None, None
        inner_forward = engine._forward

        def forward(*args, **kwargs):
            t = time.perf_counter()
            out = inner_forward(*args, **kwargs)
            end = time.perf_counter()
            self.forwards.append((t, end))
            if self.search_at is not None and self.after_search is None:
                self.after_search = end  # the forward of the injected pad: first memory token's logits
            return out

        def timed_search(queries):
            self.search_at = time.perf_counter()
            return search(queries)

        engine._forward = forward
        self.search = timed_search
        self._restore = lambda: setattr(engine, "_forward", inner_forward)

    def close(self):
        self._restore()


def main(argv=None) -> int:
    from memory.evaluation import load_questions
    from memory.vector_db import MemoryVectorDB
    from memory.search import db_search
    from recall.published import load_recall_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", required=True, help="a published version directory (models/current)")
    ap.add_argument("--questions_file", default="examples/questions.json")
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--json", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = load_recall_model(args.version, precision="fp32")
    engine, tok = model.engine, model.engine.tokenizer
    db = MemoryVectorDB(Path(args.version) / "memory_db")
    active = db.records(statuses=("active",))
    users = sorted({r.user_id for r in active})
    questions = [q["question"] for q in load_questions(args.questions_file)][:args.questions]
    rows = {"hf_generate": [], "loop_plain": [], "loop_recall": []}
    latencies, step_times, search_times = [], [], []
    try:
        search = db_search(db, users[0] if len(users) == 1 else None, 1)
        engine.generate(["warm up"], search, max_new_tokens=4)
        for q in questions:
            prompt = engine.prompt_text(q)
            enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(engine.device)
            t = time.perf_counter()
            out = engine.lm.generate(**enc, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            rows["hf_generate"].append((out.shape[1] - enc["input_ids"].shape[1]) / (time.perf_counter() - t))
            for name, force in (("loop_plain", False), ("loop_recall", True)):
                clock = _Clock(engine, search)
                try:
                    t = time.perf_counter()
                    answer = engine.generate([q], clock.search, force_recall=force, max_new_tokens=args.tokens,
                                             max_recalls=1)[0]
                    seconds = time.perf_counter() - t
                finally:
                    clock.close()
                generated = len(tok(answer.text, add_special_tokens=False)["input_ids"])
                rows[name].append(generated / seconds)
                steps = [end - start for start, end in clock.forwards[1:]]  # decode steps, not the prompt
                step_times += steps
                if force and clock.after_search is not None:
                    latencies.append(clock.after_search - clock.search_at)
                    search_times.append(clock.forwards[1][0] - clock.search_at)
    finally:
        db.close()
    step = statistics.median(step_times)
    result = {
        "date": time.strftime("%Y-%m-%d"), "version": str(args.version), "questions": len(questions),
        "tokens": args.tokens, "memories": len(active),
        "tokens_per_second": {k: statistics.median(v) for k, v in rows.items()},
        "plain_step_ms": step * 1000, "recall_latency_ms": statistics.median(latencies) * 1000,
        "query_and_search_ms": statistics.median(search_times) * 1000,
        "recall_latency_vs_plain_step": statistics.median(latencies) / step,
        "command": "python -m bench.recall_latency --version " + str(args.version)}
    tps = result["tokens_per_second"]
    result["loop_recall_vs_hf_generate"] = tps["hf_generate"] / tps["loop_recall"]
    print("| decoding (batch 1, greedy, KV cache) | tokens/s |\n|---|---|")
    for k, v in tps.items():
        print(f"| {k} | {v:.1f} |")
    print(f"\nrecall latency (query + search + injected pad forward): {result['recall_latency_ms']:.1f} ms = "
          f"{result['recall_latency_vs_plain_step']:.2f}x a plain step ({result['plain_step_ms']:.1f} ms); "
          f"query + search {result['query_and_search_ms']:.2f} ms")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
