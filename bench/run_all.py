"""Every benchmark behind docs/BENCHMARKS.md, then the document itself, in one command.

    python bench/run_all.py             # the full set (hours on the 2-core CPU; resumable)
    python bench/run_all.py --quick     # a few-minute-per-part version into bench/results/quick/
    python bench/run_all.py --only speed,latency   # some parts; --render_only: just the document

Each part runs as its own process (``python -m bench.<module> ...``), so one failing part is
reported and the others still run; the command, its wall time and its exit status are kept in
``<results>/run_all.json`` and printed in the document. Parts:
- ``speed``: training tokens/s and MFU against the measured matmul peak (bench.speed);
- ``locomo``: LoCoMo retrieval with gold memories, extraction vs gold, end to end (bench.locomo);
- ``latency``: recall latency in generation on the LoCoMo version (bench.recall_latency);
- ``search``: usearch search latency at 10k/100k/1M memories (bench.vector_db_bench);
- ``scale``: training-cycle wall time vs memories, extraction vs sessions (bench.scale).
A rerun skips nothing by itself; bench.locomo resumes from its own per-conversation results.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PARTS = ("speed", "locomo", "search", "latency", "scale")


def commands(quick: bool, results: Path) -> dict:
    py = sys.executable
    locomo_work = Path.home() / ".cache" / "recall_memory" / "bench" / "locomo" / ("quick" if quick else "full")
    version = locomo_work / "conv-26" / "models" / "current"
    if quick:
        return {
            "speed": [py, "-m", "bench.speed", "--quick", "--json", str(results / "speed.json")],
            "locomo": [py, "-m", "bench.locomo", "--quick", "--parts", "retrieval,extraction,e2e",
                       "--results", str(results / "locomo" / "quick")],
            "search": [py, "-m", "bench.vector_db_bench", "--data", "structured", "--n", "10000", "--sizes", "5000",
                       "--grid-n", "0", "--queries", "100", "--json", str(results / "search_latency.json")],
            "latency": [py, "-m", "bench.recall_latency", "--version", str(version), "--questions", "5",
                        "--json", str(results / "recall_latency.json")],
            "scale": [py, "-m", "bench.scale", "--memories", "10", "--sessions", "1,2,4",
                      "--json", str(results / "scale.json")],
        }
    return {
        "speed": [py, "-m", "bench.speed", "--json", str(results / "speed.json")],
        "locomo": [py, "-m", "bench.locomo", "--conversations", "all", "--parts", "retrieval,extraction,e2e",
                   "--results", str(results / "locomo" / "full")],
        "search": [py, "-m", "bench.vector_db_bench", "--data", "structured", "--n", "1000000",
                   "--sizes", "10000,100000", "--grid-n", "0", "--json", str(results / "search_latency.json")],
        "latency": [py, "-m", "bench.recall_latency", "--version", str(version),
                    "--json", str(results / "recall_latency.json")],
        "scale": [py, "-m", "bench.scale", "--memories", "10,100,1000", "--sessions", "1,2,4,8,16",
                  "--json", str(results / "scale.json")],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--render_only", action="store_true", help="only regenerate the document from the results")
    ap.add_argument("--results", default=None, help="default bench/results (quick: bench/results/quick)")
    ap.add_argument("--docs", default=None, help="default docs/BENCHMARKS.md (quick: <results>/BENCHMARKS.md)")
    args = ap.parse_args(argv)
    results = Path(args.results or ROOT / "bench" / "results" / ("quick" if args.quick else ""))
    docs = Path(args.docs or (results / "BENCHMARKS.md" if args.quick else ROOT / "docs" / "BENCHMARKS.md"))
    results.mkdir(parents=True, exist_ok=True)
    log_file = results / "run_all.json"
    log = json.loads(log_file.read_text()) if log_file.is_file() else {}
    if not args.render_only:
        cmds = commands(args.quick, results)
        for part in [p.strip() for p in args.only.split(",") if p.strip()]:
            if part not in cmds:
                ap.error(f"--only: unknown part {part!r} (choose from {', '.join(PARTS)})")
            print(f"== {part}: {' '.join(cmds[part])}", flush=True)
            started = time.perf_counter()
            rc = subprocess.call(cmds[part], cwd=ROOT)
            log[part] = {"command": " ".join(["python"] + cmds[part][1:]), "seconds": round(time.perf_counter() - started),
                         "exit": rc, "date": time.strftime("%Y-%m-%d %H:%M")}
            log_file.write_text(json.dumps(log, indent=1) + "\n")
            print(f"== {part}: exit {rc} after {log[part]['seconds']}s", flush=True)
    from bench.report import render

    render(results, docs, log, quick=args.quick)
    print(f"wrote {docs}")
    return 1 if any(v.get("exit") for v in log.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
