"""Incremental retraining: does replay keep old memories, and what does a cycle cost?

    python -m bench.incremental                       # both parts, default model and settings
    python -m bench.incremental --part forgetting     # or: --part cost
    python -m bench.incremental -- --decode_epochs 3  # extra run_training.py flags after --

Runs the default adapter (activated, ``--adapter_scope recall``: a cycle continues the version's
memory adapter); ``-- --adapter_scope all`` measures the merged adapter at every position. Cycles
run with ``--incremental always``: ``auto`` would retrain in full wherever that is no dearer.

**Forgetting across cycles.** ``examples/memories.jsonl`` (42 hand-written facts) is split in
time order into an initial batch and three more disjoint batches. Cycle 1 trains the initial
batch from the base model and publishes; cycles 2-4 each import the next batch and run an
incremental cycle (current version + new memories + replay). After every cycle the published
version decodes the *first* batch's memories from their DB vectors (``decode_exact_match``).
Arm A uses the configured replay (default ``replay_ratio 2.0``); arm B, in the same run and from the same
cycle-1 version, trains without replay (``replay_ratio 0``). The baseline, in the same run, is what
an incremental cycle saves: a full retrain (``--full``) on every memory after the last cycle.

**Cycle cost.** From one published version, the DB is filled up to 50 and to 500 active
memories (synthetic facts, embedded by the same encoder), then one incremental cycle with
10 new memories runs on each: its cost should follow new + replay, not the total.

Results: ``bench/results/incremental.json`` and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

FACTS = Path("examples/memories.jsonl")


def _service(work: Path, extra, *flags):
    from memory.config import parse_args
    from memory.training_service import MemoryTrainingService

    model_args, args, train_args = parse_args(["--output_dir", str(work), "--chats_dir", "", "--disable_tqdm", "true",
                                               "--k_folds", "0", "--incremental", "always", *extra, *flags])
    return MemoryTrainingService(model_args, args, train_args)


def run_cycle(work: Path, extra, *flags) -> dict:
    service = _service(work, extra, *flags)
    started = time.perf_counter()
    try:
        summary = service.run_training("all")
    finally:
        service.close()
    return {"seconds": round(time.perf_counter() - started, 1), "plan": summary.plan, "version": summary.version,
            "stage_seconds": {k: round(v, 1) for k, v in summary.stage_seconds.items()},
            "decode_exact_match_trained": (summary.decoding or {}).get("decode_exact_match")}


def decode_rate(work: Path, texts) -> dict:
    """The current version decodes these memories (by text) from their DB vectors."""
    from memory.decoding_step import exact_match_rate
    from memory.publish import open_version

    model, db = open_version(work / "models", precision="fp32")
    try:
        records = [r for r in db.records(statuses=("active",)) if r.text in set(texts)]
        decoded = model.engine.decode_memories(db.vectors([r.id for r in records]))
        return {"exact_match": exact_match_rate(decoded, [r.text for r in records]), "n": len(records)}
    finally:
        db.close()


def _write_batches(tmp: Path, sizes) -> list:
    lines = [line for line in FACTS.read_text().splitlines() if line.strip()]
    files, start = [], 0
    for i, size in enumerate(sizes):
        path = tmp / f"batch{i}.jsonl"
        path.write_text("\n".join(lines[start:start + size]) + "\n")
        files.append((path, [json.loads(x)["text"] for x in lines[start:start + size]]))
        start += size
    return files


def forgetting(tmp: Path, extra, sizes) -> dict:
    batches = _write_batches(tmp, sizes)
    first_texts = batches[0][1]
    work = tmp / "cycle1"
    logging.warning("forgetting: cycle 1 (%d memories, full)", sizes[0])
    c1 = run_cycle(work, extra, "--memories", str(batches[0][0]))
    start = decode_rate(work, first_texts)
    arms = {}
    for arm, flags in (("replay", ()), ("no_replay", ("--replay_ratio", "0"))):
        arm_work = tmp / arm
        shutil.copytree(work, arm_work, symlinks=True)  # `current` is a relative link: the copy is self-contained
        rows = [{"cycle": 1, **c1, "first_batch": start}]
        for n, (path, _) in enumerate(batches[1:], start=2):
            logging.warning("forgetting: %s, cycle %d (%d new)", arm, n, sizes[n - 1])
            row = run_cycle(arm_work, extra, "--memories", str(path), *flags)
            row.update(cycle=n, first_batch=decode_rate(arm_work, first_texts))
            rows.append(row)
        rows[-1]["every_batch"] = decode_rate(arm_work, [t for _, texts in batches for t in texts])
        arms[arm] = rows
    # the baseline an incremental cycle replaces: a full retrain from the base model on every
    # memory, from the replay arm's last state (same DB)
    full_work = tmp / "full"
    shutil.copytree(tmp / "replay", full_work, symlinks=True)
    logging.warning("forgetting: full retrain on all %d memories (baseline)", sum(sizes))
    full = run_cycle(full_work, extra, "--full")
    full.update(first_batch=decode_rate(full_work, first_texts),
                every_batch=decode_rate(full_work, [t for _, texts in batches for t in texts]))
    return {"batch_sizes": sizes, "arms": arms, "full_retrain": full}


def _synthetic_facts(n: int) -> list:
    things = ["book", "film", "song", "city", "dish", "game", "painter", "band", "sport", "flower", "car", "museum"]
    names = ["Orla", "Bento", "Ines", "Tomas", "Greta", "Kofi", "Mina", "Paulo", "Rui", "Sana", "Yuki", "Zara",
             "Lars", "Noor", "Ade", "Cleo", "Dara", "Emil", "Fay", "Hugo"]
    out = []
    for i in range(n):
        out.append(f"The user's friend {names[i % len(names)]} recommended a {things[(i // len(names)) % len(things)]} "
                   f"numbered {i + 100}.")
    return out


def cost(tmp: Path, extra, new: int = 10, existing=(50, 500)) -> dict:
    """One incremental cycle of ``new`` memories on a DB with ``existing`` active memories."""
    from memory.schema import MemoryCandidate

    lines = [line for line in FACTS.read_text().splitlines() if line.strip()]
    seed = tmp / "cost-seed.jsonl"
    seed.write_text("\n".join(lines[:8]) + "\n")
    fresh = tmp / "cost-new.jsonl"
    fresh.write_text("\n".join(lines[-new:]) + "\n")
    base = tmp / "cost-base"
    logging.warning("cost: initial version on 8 memories")
    run_cycle(base, extra, "--memories", str(seed))
    rows = {}
    for total in existing:
        work = tmp / f"cost-{total}"
        shutil.copytree(base, work, symlinks=True)
        service = _service(work, extra)
        try:  # fill the DB with active memories the current version "knows" (bank fillers)
            texts = _synthetic_facts(total - 8)
            vectors = service.vectorizer().encode(texts)
            service.db.add([MemoryCandidate(text=t, user_id="alex", source="import") for t in texts], vectors,
                           service.db.encoder_id, status="active")
            service.db.flush()
        finally:
            service.close()
        logging.warning("cost: cycle with %d new on %d existing", new, total)
        rows[str(total)] = run_cycle(work, extra, "--memories", str(fresh))
    return {"new": new, "by_existing": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("forgetting", "cost", "all"), default="all")
    ap.add_argument("--sizes", default="8,6,6,6", help="initial batch, then one batch per incremental cycle")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default="bench/results/incremental.json")
    ap.add_argument("extra", nargs="*", help="run_training.py flags (after --)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    tmp = Path(args.work or tempfile.mkdtemp(prefix="bench-incremental-"))
    tmp.mkdir(parents=True, exist_ok=True)
    path = Path(args.json)
    out = json.loads(path.read_text()) if path.exists() else {}  # a part not rerun keeps its last result
    out.pop("extra_flags", None), out.pop("seconds", None)
    started = time.perf_counter()
    if args.part in ("forgetting", "all"):
        part_started = time.perf_counter()
        out["forgetting"] = forgetting(tmp, args.extra, [int(x) for x in args.sizes.split(",")])
        out["forgetting"].update(extra_flags=args.extra, date=time.strftime("%Y-%m-%d %H:%M"),
                                 seconds=round(time.perf_counter() - part_started, 1))
        print("\n| cycle | replay: first-batch exact decode | cycle s | no replay: first-batch exact decode | cycle s |")
        print("|---|---|---|---|---|")
        for a, b in zip(*(out["forgetting"]["arms"][k] for k in ("replay", "no_replay"))):
            print(f"| {a['cycle']} | {a['first_batch']['exact_match']:.3f} (n={a['first_batch']['n']}) | "
                  f"{a['seconds']:.0f} | {b['first_batch']['exact_match']:.3f} | {b['seconds']:.0f} |")
        full, last = out["forgetting"]["full_retrain"], out["forgetting"]["arms"]["replay"][-1]
        print(f"\nfull retrain on all {sum(out['forgetting']['batch_sizes'])} memories: {full['seconds']:.0f} s, "
              f"every batch decodes {full['every_batch']['exact_match']:.3f}; the last incremental cycle: "
              f"{last['seconds']:.0f} s, every batch {last['every_batch']['exact_match']:.3f}")
    if args.part in ("cost", "all"):
        part_started = time.perf_counter()
        out["cost"] = cost(tmp, args.extra)
        out["cost"].update(extra_flags=args.extra, date=time.strftime("%Y-%m-%d %H:%M"),
                           seconds=round(time.perf_counter() - part_started, 1))
        print("\n| existing active memories | new | trained (new + replay) | cycle s | step 1 s | step 2 s |")
        print("|---|---|---|---|---|---|")
        for total, row in out["cost"]["by_existing"].items():
            p, st = row["plan"], row["stage_seconds"]
            print(f"| {total} | {p['new']} | {p['memories']} | {row['seconds']:.0f} | {st.get('recall', 0):.0f} | "
                  f"{st.get('decode', 0):.0f} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwritten {args.json} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
