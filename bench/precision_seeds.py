"""Does bf16 autocast training cost step-1 retrieval quality? The same step-1 benchmark over
several seeds, trained under bf16 autocast and in fp32, alternating, so host drift hits both.

    python -m bench.precision_seeds [--seeds 1,2,3] [--k_folds 0] [--json bench/results/precision_seeds.json]

Each run is ``python -m bench.recall_step1 --no_throughput --train_precision P --seed S`` (the
annotated memories of ``examples/``, the 49 held-out questions of ``examples/questions.json``; with
``--k_folds 0`` only the kept adapter trains, about a minute a run here). Reports held-out
recall@1 / recall@5 / MRR per run and their mean ± std per precision, the MiniLM peer of the same
runs, and the training time. Needs a CPU with bf16 units for the comparison to mean anything
(elsewhere ``bf16`` training is emulated and very slow).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRECISIONS = ("bf16", "fp32")


def run_one(seed: int, precision: str, k_folds: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.recall_step1", "--no_throughput", "--k_folds", str(k_folds),
           "--train_precision", precision, "--seed", str(seed), "--json", str(out)]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    data = json.loads(out.read_text())
    q = data["questions"]
    row = {"seed": seed, "precision": precision, "trained_in": data.get("trained_in"),
           "wall_seconds": round(time.perf_counter() - started, 1), "train_seconds": round(data["train_seconds"], 1),
           **{f"trained_{k}": q["trained_recall"][k] for k in ("recall_at_1", "recall_at_5", "mrr")},
           "minilm_recall_at_1": q["minilm_rag"]["recall_at_1"]}
    kfold = data["metrics"].get("kfold")
    if kfold:
        row["kfold_recall_at_1"] = kfold["recall_at_1_mean"]
    return row


def summary(rows, precision: str) -> dict:
    mine = [r for r in rows if r["precision"] == precision]
    out = {"runs": len(mine)}
    for key in ("trained_recall_at_1", "trained_recall_at_5", "trained_mrr", "train_seconds", "kfold_recall_at_1"):
        values = [r[key] for r in mine if key in r]
        if values:
            out[key] = {"mean": statistics.mean(values), "std": statistics.pstdev(values), "values": values}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--k_folds", type=int, default=0)
    ap.add_argument("--json", default="bench/results/precision_seeds.json")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for precision in PRECISIONS:
                row = run_one(seed, precision, args.k_folds, Path(tmp) / f"{precision}_{seed}.json")
                rows.append(row)
                print(f"seed {seed} {precision}: held-out recall@1 {row['trained_recall_at_1']:.3f} "
                      f"(MiniLM {row['minilm_recall_at_1']:.3f}), {row['train_seconds']:.0f} s", flush=True)
    from bench.speed import cpu_description

    result = {"date": time.strftime("%Y-%m-%d"), "machine": cpu_description(),
              "command": "python -m bench.precision_seeds" + (f" --seeds {args.seeds}" if args.seeds != "1,2,3" else "")
              + (f" --k_folds {args.k_folds}" if args.k_folds else ""),
              "rows": rows, "summary": {p: summary(rows, p) for p in PRECISIONS}}
    print("\n| training | held-out recall@1 | recall@5 | MRR | step-1 bench s |\n|---|---|---|---|---|")
    for p in PRECISIONS:
        s = result["summary"][p]
        cell = lambda k: f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}"  # noqa: E731
        print(f"| {p} | {cell('trained_recall_at_1')} | {cell('trained_recall_at_5')} | {cell('trained_mrr')} | "
              f"{s['train_seconds']['mean']:.0f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
