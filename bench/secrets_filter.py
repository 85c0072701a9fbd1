"""Secret filter: the library detectors vs hand-written regexes on labelled sentences.

    python -m bench.secrets_filter

Two labelled sets written for this project (``bench/data``): ``secrets_labelled.jsonl`` (80
sentences; the library mode's two supplementary patterns were added after reading its misses
on this set, so its figure there is optimistic) and ``secrets_heldout.jsonl`` (40 sentences,
written before either detector was run on them). Each sentence is a secret or a look-alike
(order, phone, ISBN and tracking numbers, card-shaped numbers failing Luhn, "the password is
strong"). Precision, recall and per-sentence time for ``library`` and ``regex``, same run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from memory.secrets import SecretFilter

SETS = {"labelled (tuning)": Path("bench/data/secrets_labelled.jsonl"),
        "held-out": Path("bench/data/secrets_heldout.jsonl")}


def score(detector: str, rows) -> dict:
    f = SecretFilter(detector)
    started = time.perf_counter()
    flagged = [bool(f.find(r["text"])) for r in rows]
    seconds = time.perf_counter() - started
    tp = sum(p and r["secret"] for p, r in zip(flagged, rows))
    fp = sum(p and not r["secret"] for p, r in zip(flagged, rows))
    fn = sum(not p and r["secret"] for p, r in zip(flagged, rows))
    misses = [r["kind"] for p, r in zip(flagged, rows) if r["secret"] and not p]
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1), "false_positives": fp,
            "missed_kinds": sorted(misses), "ms_per_text": 1000 * seconds / len(rows), "n": len(rows)}


def main():
    out = {}
    print("| set | detector | precision | recall | false positives | missed | ms/text |")
    print("|---|---|---|---|---|---|---|")
    for name, path in SETS.items():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for detector in ("library", "regex"):
            r = out.setdefault(name, {})[detector] = score(detector, rows)
            print(f"| {name} (n={r['n']}) | {detector} | {r['precision']:.3f} | {r['recall']:.3f} | "
                  f"{r['false_positives']} | {', '.join(r['missed_kinds']) or '-'} | {r['ms_per_text']:.2f} |")
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/secrets_filter.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
