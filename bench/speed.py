"""Training speed against this machine's limit: tokens/s and MFU of both trainers, with the
naive baseline and each lever measured in the same run.

    python -m bench.speed                  # ~15 min on the 2-core CPU
    python -m bench.speed --quick          # fewer steps, no bf16 (minutes)

Everything runs through the real trainers (``bench.gpu_train.build_trainer``) on the real
default model (SmolLM2-135M-Instruct, fp32 weights) and the synthetic data of the pipeline's
shapes. The same process measures the machine's fp32 and bf16 matmul peak (2048^3, torch, all
cores; 1024^3 where bf16 is slow) before every row and keeps the best reading of the run. MFU =
useful FLOPs (``bench.gpu_train``: real tokens only, the LM head only where there is a label,
backward 2x forward for the frozen base) / time / measured peak of the precision used; the figure
against the bf16 peak is printed next to it.

Step-2 variants (same data, same seed):
- ``naive``: fp32, every batch padded to ``max_length`` (192), the 49k-wide LM head on every position,
  batches in random order;
- ``default``: padding to the longest sample in the batch, the LM head only on labelled positions
  (the adapter at every position, ``--adapter_scope all``);
- ``activated adapter`` (the pipeline's default, ``recall/activation.py``): the context runs
  forward only, without gradient; the adapter and the backward pass start at ``<recall>``. Its
  samples are the memory and sandwich kinds (pure SFT samples never reach an activated adapter),
  and its MFU counts the context as forward-only work;
- ``default + length-grouped batches`` (``--decode_length_grouped``: on by default with the
  activated adapter; with ``all`` it cost agreement in the one pipeline run measured, see README), ``default + pad to multiple of 8``,
  ``default + bf16 autocast``, ``activated adapter + bf16 autocast``: levers, kept as defaults
  only where they measure faster.
Step 1: fp32 and bf16 autocast (it has no LM head at all), and the activated adapter in both.
The bf16 rows run the fp32 rows' batches where this CPU multiplies faster in bf16 (AVX512-BF16
or AMX); where it emulates bf16 (~1 GFLOP/s) they time one step of batch 2 (``SLOW_BF16``).
Writes ``bench/results/speed.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

RESULTS = Path("bench/results/speed.json")


def cpu_description() -> str:
    """The CPU's model name and its bf16 units (the hosts here differ: some have AVX512-BF16)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "cpu"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "cpu")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    units = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, " + (" and ".join(units) if units else "no bf16 units")


def _opts(**kw):
    """``bench.gpu_train``'s options: its command line's defaults, this benchmark's, then ``kw``."""
    from bench.gpu_train import parser

    base = vars(parser().parse_args([]))
    base.update(step="decode", size="default", steps=6, warmup=2, batch=8, memories=64, precision="fp32",
                device="cpu", work="/tmp/bench_speed")
    base.update(kw)
    return argparse.Namespace(**base)


VARIANTS = [  # (name, step, options)
    ("step 2 naive: fp32, pad to 192, LM head everywhere", "decode", dict(naive=True, pad_multiple=192)),
    ("step 2 default: fp32, dynamic padding, LM head on labels", "decode", {}),
    ("step 2 activated adapter (pipeline default): context without gradient", "decode",
     dict(adapter_scope="recall")),
    ("step 2 default + length-grouped batches", "decode", dict(length_grouping=True)),
    ("step 2 default + pad to multiple of 8", "decode", dict(pad_multiple=8)),
    ("step 2 default + bf16 autocast", "decode", dict(precision="bf16")),
    ("step 2 activated adapter + bf16 autocast", "decode", dict(adapter_scope="recall", precision="bf16")),
    # close to how the pipeline trains after its preserve-target pass: the context cache on, 8
    # memories, so the warm-up steps have seen most contexts (the SFT prompts sampled differ per
    # epoch, so some still miss: 22 misses in 10 timed steps on 2026-12-03; the FLOPs count the
    # context tokens that ran, bench.gpu_train), length-grouped batches; the CPU bf16 levers of
    # recall/cpu_bf16.py (bf16 weight copies, fp32 attention) are measured on and off
    ("step 2 activated adapter, contexts cached: fp32", "decode",
     dict(adapter_scope="recall", memories=8, warmup=8, steps=10, length_grouping=True)),
    ("step 2 activated adapter, contexts cached: bf16 autocast without the CPU bf16 levers", "decode",
     dict(adapter_scope="recall", memories=8, warmup=8, steps=10, length_grouping=True, precision="bf16", no_bf16_levers=True)),
    ("step 2 activated adapter, contexts cached: bf16 autocast + CPU bf16 levers (pipeline default)", "decode",
     dict(adapter_scope="recall", memories=8, warmup=8, steps=10, length_grouping=True, precision="bf16")),
    ("step 1 default: fp32, no LM head", "recall", dict(batch=16)),
    # the context cache off, so every context's forward pass (counted in the FLOPs) is really run;
    # the backward pass is counted at <recall> alone (bench.gpu_train.CountingCollator, query=True):
    # counting it over the whole context reported MFU 1.14-1.23 for this row
    ("step 1 activated adapter (pipeline default): context without gradient, context cache off", "recall",
     dict(batch=16, adapter_scope="recall", context_cache_mb=0)),
    ("step 1 + bf16 autocast", "recall", dict(batch=16, precision="bf16")),
    ("step 1 activated adapter + bf16 autocast, context cache off", "recall",
     dict(batch=16, adapter_scope="recall", context_cache_mb=0, precision="bf16")),
]
# where this CPU has no bf16 units, bf16 runs ~1 GFLOP/s (157x below fp32 on the 2026-11-27 host):
# the bf16 rows then time one small step only
SLOW_BF16 = dict(batch=2, steps=1, warmup=1)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# PEAK_NOTE: on the shared 2-core VM the same matmul measured 0.107-0.176 TFLOP/s (fp32) and
# 0.38-0.73 (bf16) within a minute with nothing else running: one measurement at the start made
# MFU swing by the machine's mood. The peak is measured again before every row, the best reading
# of the run is the ceiling, and every row's MFU uses it.


def main(argv=None) -> int:
    from bench.gpu_train import matmul_peak, run

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 timed steps, no bf16 variants")
    ap.add_argument("--json", default=str(RESULTS))
    ap.add_argument("--only", default=None, help="comma-separated name substrings: re-measure these rows and "
                                                  "replace them in --json, keeping the others (each row records "
                                                  "the peak and time of its own run)")
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    peaks = {p: matmul_peak(device, d) for p, d in DTYPES.items()}
    print(f"measured matmul peak: fp32 {peaks['fp32']:.3f} TFLOP/s, bf16 {peaks['bf16']:.3f} TFLOP/s", flush=True)
    rows = []
    wanted = [w.strip() for w in args.only.split(",")] if args.only else None
    for name, step, kw in VARIANTS:
        if args.quick and kw.get("precision") == "bf16":
            continue
        if wanted and not any(w in name for w in wanted):
            continue
        if kw.get("precision") == "bf16" and peaks["bf16"] < peaks["fp32"]:
            kw = {**kw, **SLOW_BF16}
        if args.quick:
            kw = {**kw, "steps": min(kw.get("steps", 6), 3), "warmup": 1}
        if rows:  # the ceiling is re-measured before each row and the best kept (see PEAK_NOTE)
            peaks = {p: max(v, matmul_peak(device, DTYPES[p])) for p, v in peaks.items()}
        started = time.perf_counter()
        out = run(_opts(step=step, **kw))
        out.update(name=name, wall=time.perf_counter() - started, measured_at=time.strftime("%Y-%m-%d %H:%M"))
        rows.append(out)
        print(f"{name}: {out['tokens_per_second']:.0f} tokens/s, {out['tflops_per_second']:.4f} TFLOP/s "
              f"({out['wall']:.0f}s)", flush=True)
    for out in rows:  # MFU against the best ceiling measured in this run
        tflops = out["tflops_per_second"]
        out.update(mfu=tflops / peaks[out["precision"]], mfu_vs_bf16_peak=tflops / peaks["bf16"],
                   peak_tflops_of_run=peaks)
    print(f"best matmul peak over the run: fp32 {peaks['fp32']:.3f} TFLOP/s, bf16 {peaks['bf16']:.3f} TFLOP/s",
          flush=True)
    command = "python -m bench.speed" + (" --quick" if args.quick else "")
    if wanted:  # merge into the earlier run's rows, in VARIANTS order
        earlier = json.loads(Path(args.json).read_text())
        fresh = {r["name"]: r for r in rows}
        order = [name for name, _, _ in VARIANTS]
        kept = [r for r in earlier["rows"] if r["name"] not in fresh]
        rows = sorted(kept + list(fresh.values()), key=lambda r: order.index(r["name"]) if r["name"] in order else 99)
        peaks = earlier["peak_tflops"]
        command = earlier.get("command", command) + f"; rows re-measured with --only {args.only}"
    naive = next((r for r in rows if r["name"].startswith("step 2 naive")), None)
    for r in rows:
        r["vs_naive"] = r["tokens_per_second"] / naive["tokens_per_second"] if r["step"] == "decode" and naive else None
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_description()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}", "peak_tflops": peaks, "rows": rows,
              "command": command}
    print("\n| configuration | tokens/s | vs naive | TFLOP/s | MFU (own precision's peak) | MFU vs bf16 peak |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['vs_naive']:.2f}x" if r["vs_naive"] else "-"
        print(f"| {r['name']} | {r['tokens_per_second']:.0f} | {vs} | {r['tflops_per_second']:.4f} | "
              f"{r['mfu']:.3f} | {r['mfu_vs_bf16_peak']:.3f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
