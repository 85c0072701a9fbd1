"""The recall threshold of a published version: the calibration ``--recall_threshold auto``
computes, and what each threshold lets through on held-out questions.

    python -m bench.threshold --version WORK/models/current [--questions examples/questions.json]
                              [--general_prompts examples/dev/general_prompts.json]
                              [--json bench/results/threshold.json]

On the version and its own memory DB, in one process:
- the calibration of ``memory.decoding_step.calibrate_threshold`` on the version's trained
  cues (each active memory's text and stored cues) and the calibration prompts
  (``memory.sft_data.calibration_prompts``: 462 general prompts no memory answers and nothing
  trains on): the value, the bound that decided it, and how often each sample passes;
- the unrelated-prompt bound alone at rates 0.01, 0.025 and 0.05, beside the rule it replaced
  (numpy's "lower" 97.5% quantile of the 67 bundled prompts);
- for each threshold (0, the old default 0.5, the version's own, the calibrated one and those
  bounds), on the
  held-out questions: the share whose top memory (the question's user's, as the recall loop
  searches) is at or above the threshold and contains ``expected`` ("right, injected"), and the
  share at or above it at all ("injected"), and the share of the 40 held-out general prompts
  (``memory/data/heldout_prompts.json``, never trained on) that would inject a memory, and with
  ``--general_prompts`` the same share on that file's prompts (the dev set's
  ``examples/dev/general_prompts.json``: everyday requests, most in the first person).
The questions only measure; nothing is fitted to them. Retrieval only: decoding is
``evaluate.py``'s job.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path("bench/results/threshold.json")


def measure(version: str, questions_path: str, general_prompts: str = "") -> dict:
    from memory.cues import memory_cues
    from memory.decoding_step import calibrate_threshold, rejecting_level
    from memory.evaluation import by_user
    from memory.sft_data import HELDOUT_PROMPTS, calibration_prompts, read_prompts
    from memory.search import db_search
    from memory.publish import open_version

    model, db = open_version(version, precision="fp32")
    try:
        engine = model.engine
        records = db.records(statuses=("active",))
        bank = db.vectors([r.id for r in records])
        cues = memory_cues(records)
        contexts = [(c.text, row) for row, r in enumerate(records) for c in cues[r.id]]
        calibration = calibrate_threshold(engine, [c for c, _ in contexts], [t for _, t in contexts], calibration_prompts(),
                                          bank)
        questions = json.loads(Path(questions_path).read_text())
        best = []  # (score of the top memory, whether it holds the answer)
        for user, group in by_user(questions).items():
            hits = db_search(db, user, 1)(engine.query_vectors([q["question"] for q in group]))
            for q, h in zip(group, hits):
                top = h[0] if h else None
                best.append((top.score if top else -1.0, bool(top and q["expected"].lower() in top.text.lower())))
        own = float(model.config.get("recall_threshold", 0.5))
        # general prompts no memory answers and nothing trained on: how often each threshold injects one
        unit = bank / np.linalg.norm(bank, axis=1, keepdims=True).clip(1e-12)
        heldout = (engine.query_vectors(read_prompts(HELDOUT_PROMPTS)) @ unit.T).max(1)
        extra = (engine.query_vectors(read_prompts(Path(general_prompts))) @ unit.T).max(1) if general_prompts else None
        # the unrelated-prompt bound alone, by calibration sample and rate, beside the quantile rule
        # of the 67 bundled prompts it replaced
        small = (engine.query_vectors(calibration_prompts(extra=None)) @ unit.T).max(1)
        large = (engine.query_vectors(calibration_prompts()) @ unit.T).max(1)
        levels = {"67 prompts, 97.5% quantile (previous rule)": float(np.quantile(small, 0.975, method="lower"))}
        for rate in (0.01, 0.025, 0.05):
            levels[f"{len(large)} prompts, at most {rate:g} pass"] = rejecting_level(large, rate)
        rows = {}
        for name, t in (("none (0)", 0.0), ("old default (0.5)", 0.5), ("the version's", own),
                        ("calibrated", calibration["value"]), *levels.items()):
            rows[name] = {"threshold": t, "right_injected": float(np.mean([ok and s >= t for s, ok in best])),
                          "injected": float(np.mean([s >= t for s, _ in best])),
                          "heldout_prompts_injected": float(np.mean(heldout >= t))}
            if extra is not None:
                rows[name]["general_prompts_injected"] = float(np.mean(extra >= t))
        return {"version": str(version), "date": time.strftime("%Y-%m-%d %H:%M"), "questions": len(best),
                "general_prompts": general_prompts or None, "calibration": calibration, "thresholds": rows}
    finally:
        db.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", required=True, help="a version directory or a models directory (its current)")
    ap.add_argument("--questions", default="examples/questions.json")
    ap.add_argument("--general_prompts", default="", help="a JSON list of general prompts: a column of its own")
    ap.add_argument("--json", default=str(RESULTS))
    args = ap.parse_args(argv)
    result = measure(args.version, args.questions, args.general_prompts)
    c = result["calibration"]
    print(f"calibrated {c['value']:.3f} (decided by {c['decided_by']}): passes {c['correct_pass']:.2f} of correct "
          f"training cues (median {c['correct_best_median']:.3f}) and {c['unrelated_pass']:.2f} of unrelated prompts "
          f"(median {c['unrelated_best_median']:.3f})")
    extra = f" {result['general_prompts']} injected |" if result["general_prompts"] else ""
    print(f"\n| threshold ({result['questions']} questions) | value | right memory injected | any injected | "
          f"held-out general prompts injected |{extra}")
    print("|---|---|---|---|---|" + ("---|" if extra else ""))
    for name, row in result["thresholds"].items():
        cell = f" {row['general_prompts_injected']:.3f} |" if extra else ""
        print(f"| {name} | {row['threshold']:.3f} | {row['right_injected']:.3f} | {row['injected']:.3f} | "
              f"{row['heldout_prompts_injected']:.3f} |{cell}")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
