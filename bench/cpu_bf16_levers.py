"""The CPU bf16 levers of ``recall/cpu_bf16.py`` (bf16 copies of the frozen weights, fp32
attention), on and off, in one process on the same batches.

    python -m bench.cpu_bf16_levers [--reps 6]

Step 2 as the pipeline trains it on a CPU with bf16 units: the default model, the activated
adapter, length-grouped batches of synthetic samples (``bench.gpu_train``'s data, 8 memories),
every context already in the context cache (one untimed pass over the batches fills it), bf16
autocast. Each repetition times one pass over the same 12 batches (forward, backward, AdamW
step) with the levers on and one with them off, alternating which goes first; the first two
also time a pass in fp32 (no autocast), the baseline. Separate
processes differ by more than the levers do on the 2-core hosts here (the same fp32 work took
1.6–2.6 s from one process to the next), so the comparison stays inside one process.
Writes ``bench/results/cpu_bf16_levers.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path("bench/results/cpu_bf16_levers.json")


def main(argv=None) -> int:
    from bench.gpu_train import CountingCollator, _timer, build_trainer
    from bench.speed import _opts, cpu_description
    from recall.cpu_bf16 import bf16_cpu_training

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--json", default=str(RESULTS))
    args = ap.parse_args(argv)
    opts = _opts(step="decode", adapter_scope="recall", memories=8, warmup=0, steps=1, length_grouping=True,
                 precision="bf16")
    trainer, _, _ = build_trainer(opts, torch.device("cpu"), _timer(0))
    model = trainer.model
    batches = [{k: v for k, v in b.items() if k != CountingCollator.COUNTS_KEY}
               for _, b in zip(range(args.batches), trainer.get_train_dataloader())]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    def one_pass(bf16: bool = True) -> float:
        started = time.perf_counter()
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    one_pass()  # fills the context cache, as the pipeline's preserve-target pass does
    misses = model.context_cache.misses if model.context_cache is not None else None
    times = {"levers on": [], "levers off": [], "fp32": []}
    for rep in range(args.reps):
        for mode in (("levers on", "levers off") if rep % 2 == 0 else ("levers off", "levers on")):
            if mode == "levers on":
                with bf16_cpu_training(model, trainer.args, "cpu"):
                    times[mode].append(one_pass())
            else:
                times[mode].append(one_pass())
        if rep < 2:  # the fp32 baseline (no autocast; the levers do nothing there), twice
            times["fp32"].append(one_pass(bf16=False))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{cpu_description()}, {torch.get_num_threads()} "
              f"threads, torch {torch.__version__}", "command": "python -m bench.cpu_bf16_levers",
              "batches": len(batches), "tokens_per_pass": tokens,
              "context_cache_misses_while_timed": None if misses is None else model.context_cache.misses - misses,
              "seconds": times, "median_seconds": medians,
              "tokens_per_second": {k: tokens / v for k, v in medians.items()},
              "speedup": medians["levers off"] / medians["levers on"],
              "speedup_over_fp32": medians["fp32"] / medians["levers on"],
              "on_faster_in_every_repetition": all(a < b for a, b in zip(times["levers on"], times["levers off"]))}
    print("| step 2, contexts cached, bf16 autocast | median s per pass | tokens/s |\n|---|---|---|")
    for k in ("fp32", "levers off", "levers on"):
        print(f"| {k} | {medians[k]:.2f} | {result['tokens_per_second'][k]:.0f} |")
    print(f"speed-up {result['speedup']:.2f}x over bf16 without the levers, {result['speedup_over_fp32']:.2f}x over fp32; "
          "levers on faster in every repetition: "
          f"{result['on_faster_in_every_repetition']}; cache misses while timed: "
          f"{result['context_cache_misses_while_timed']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
