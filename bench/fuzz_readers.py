"""Long fuzzing run of the user-file readers (CI runs a fixed-seed few hundred per reader).

    python -m bench.fuzz_readers --examples 20000

Random seed per run (``--derandomize`` for CI's fixed one); prints examples tried and time per
reader. A failure prints hypothesis's minimal falsifying input and exits 1.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tests.fuzz_readers import PROPERTIES


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=5000, help="per reader (config YAML gets a tenth)")
    ap.add_argument("--derandomize", action="store_true")
    ap.add_argument("--json", default="bench/results/fuzz_readers.json")
    args = ap.parse_args()
    out = {}
    print("| reader | examples | outcome | seconds |")
    print("|---|---|---|---|")
    failed = False
    for name, make in PROPERTIES.items():
        n = args.examples // 10 if name == "config YAML" else args.examples
        started = time.perf_counter()
        try:
            make(n, args.derandomize)()
            outcome = "every input parsed or raised a format error naming the file; nothing written"
        except Exception as exc:  # hypothesis re-raises the minimal failing example
            outcome, failed = f"FAILED: {type(exc).__name__}: {exc}"[:300], True
        seconds = time.perf_counter() - started
        out[name] = {"examples": n, "outcome": outcome, "seconds": round(seconds, 1)}
        print(f"| {name} | {n} | {outcome} | {seconds:.0f} |", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
