"""Memory management: ``python -m memory {list,search,show,add,forget,export} [--output_dir DIR]``.

    python -m memory list --user alex                 # id, status, text (default: pending + active)
    python -m memory search "where do I live" --user alex -k 5
    python -m memory show 12                          # the record and where it came from
    python -m memory add "The user is allergic to nuts." --user alex
    python -m memory forget 12 13 --yes               # erased now; the next cycle retrains without it
    python -m memory export --out memories.jsonl      # re-importable with run_training.py --memories

Model options (``--config``, ``--model_name_or_path``, ``--embedding_model`` ...) are those of
run_training.py; only ``search`` and ``add`` load a model (to embed text).
Exit codes: 0 ok, 1 not found / bad input, 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path
from typing import List, Optional

from memory.vector_db import STATUSES, MemoryVectorDB


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--output_dir", default="output", help="run_training.py's output directory (holds memory_db/)")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list memories")
    p.add_argument("--user", default=None)
    p.add_argument("--status", action="append", choices=STATUSES, help="repeatable (default: pending, active)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = sub.add_parser("search", help="semantic search (the memory encoder)")
    p.add_argument("query")
    p.add_argument("--user", default=None)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--status", action="append", choices=STATUSES, help="repeatable (default: pending, active)")
    p = sub.add_parser("show", help="one memory with its provenance")
    p.add_argument("id", type=int)
    p = sub.add_parser("add", help="add a memory by hand (trained in the next cycle)")
    p.add_argument("text")
    p.add_argument("--user", default=None, help="default: the configured default_user_id")
    p = sub.add_parser("forget", help="erase memories now and exclude them from training")
    p.add_argument("ids", type=int, nargs="+")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = sub.add_parser("export", help="write memories as JSONL (run_training.py --memories reads it back)")
    p.add_argument("--out", default="-", help="file (default: stdout)")
    p.add_argument("--user", default=None)
    p.add_argument("--status", action="append", choices=STATUSES, help="repeatable (default: active)")
    return ap


def _db(output_dir: str) -> MemoryVectorDB:
    path = Path(output_dir) / "memory_db"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no memory database here (wrong --output_dir?)")
    return MemoryVectorDB(path)


def _service(output_dir: str, rest: List[str]):
    from memory.config import parse_args
    from memory.training_service import MemoryTrainingService

    model_args, args, train_args = parse_args(["--output_dir", output_dir, *rest])
    return MemoryTrainingService(model_args, args, train_args)


def _safe(text) -> str:
    """Text for the terminal: control characters (escape sequences, newlines) shown escaped, so
    a memory or user id cannot move the cursor, recolour or fake lines of the output."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _line(r) -> str:
    return f"{r.id:>6}  {r.status:<10} {_safe(r.user_id):<12} {_safe(r.text)}"


def _provenance(r) -> List[str]:
    lines = [f"id:          {r.id}", f"user:        {_safe(r.user_id)}", f"status:      {r.status}"
             + (f" (by {r.superseded_by})" if r.superseded_by else ""), f"text:        {_safe(r.text)}",
             f"source:      {r.source}", f"created:     {r.created_at}", f"updated:     {r.updated_at}"]
    if r.session_id:
        lines.append(f"session:     {_safe(r.session_id)}, message {r.message_index}, said at {r.said_at or '?'}")
    if r.cues:
        from memory.cues import Cue

        lines += ["cues:"] + [f"  - {c.kind}: {_safe(c.text)}" for c in map(Cue.decode, r.cues)]
    from memory.questions import template_questions

    questions = template_questions(r.text)
    if questions:  # step 1 drops one that another memory of the user also gets
        lines += ["rule-made questions:"] + [f"  - {_safe(q)}" for q in questions]
    return lines


def _forget_in_versions(models_dir: Path, ids: List[int]) -> int:
    """Erase ``ids`` from every published version's DB snapshot too (recall reads those)."""
    from memory.publish import forget_in_version, list_versions

    versions = list_versions(models_dir) if models_dir.is_dir() else []
    return sum(forget_in_version(version, ids) for version in versions)


def main(argv: Optional[List[str]] = None) -> int:
    from memory.fileio import private_umask

    with private_umask():  # what this writes is the user's alone (0600 files, 0700 directories)
        return _main(argv)


def _main(argv: Optional[List[str]] = None) -> int:
    ap = _parser()
    args, rest = ap.parse_known_args(argv)
    if rest and args.command not in ("search", "add"):
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return _run(args, rest)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 1
    except sqlite3.OperationalError as exc:  # "database is locked" (a run holds it), a read-only file...
        print(f"error: {args.output_dir}/memory_db: {exc}" + ("; a training run is writing it, try again when it "
              "has finished" if "locked" in str(exc) else ""), file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a permission: one line naming the path
        print(f"error: {exc.filename or args.output_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _run(args, rest: List[str]) -> int:
    if args.command in ("list", "export"):
        return _list_or_export(args)
    if args.command == "show":
        with _db(args.output_dir) as db:
            r = db.get(args.id)
        print("\n".join(_provenance(r)))
        return 0
    if args.command == "forget":
        with _db(args.output_dir) as db:
            records = [db.get(i) for i in args.ids]
            if not args.yes:
                for r in records:
                    print(_line(r))
                if input(f"forget these {len(records)} memories? [y/N] ").strip().lower() not in ("y", "yes"):
                    print("nothing forgotten")
                    return 1
            db.forget(args.ids)
        versions = _forget_in_versions(Path(args.output_dir) / "models", args.ids)
        print(f"forgot {len(args.ids)} memories (database and {versions} published snapshots); the next training "
              "cycle retrains from the base model without them")
        return 0
    service = _service(args.output_dir, rest)
    try:
        if args.command == "add":
            from memory.ingest import ingest_candidates
            from memory.schema import MemoryCandidate

            text = " ".join(args.text.split())
            if not text:
                raise ValueError("add: the memory text is empty")
            user = args.user or service.args.default_user_id
            report = ingest_candidates(service.db, [MemoryCandidate(text=text, user_id=user, source="manual")],
                                       service.vectorizer(), near_duplicate_cosine=service.args.near_duplicate_cosine,
                                       secret_filter=service.secret_filter)
            service.db.flush()
            if report.added:
                print(f"added memory {report.added[0]} for {user} (pending: trained in the next cycle)")
            else:
                print(f"not added: {json.dumps(report.events[-1] if report.events else report.counts())}")
            return 0
        query = service.vectorizer().encode([args.query])
        hits = service.db.search(query, k=args.k, user_id=args.user,
                                 statuses=tuple(args.status or ("pending", "active")))[0]
        for h in hits:
            print(f"{h.score:.3f}  {_line(h.record)}")
        return 0
    finally:
        service.close()


def _list_or_export(args) -> int:
    default = ("active",) if args.command == "export" else ("pending", "active")
    with _db(args.output_dir) as db:
        records = db.records(user_id=args.user, statuses=tuple(args.status or default))
        left = {s: db.count(user_id=args.user, statuses=(s,)) for s in ("pending", "active", "superseded")
                if s not in tuple(args.status or default)}  # what the filter left out (export says so)
    if args.command == "list":
        for r in records:
            print(json.dumps(_as_json(r), ensure_ascii=False) if args.json else _line(r))
        if not args.json:
            print(f"{len(records)} memories", file=sys.stderr)
        return 0
    body = "".join(json.dumps({"text": r.text, "user_id": r.user_id, "created_at": r.said_at or r.created_at,
                               "session_id": r.session_id, "message_index": r.message_index,
                               "said_at": r.said_at, "status": r.status, "source": r.source},
                              ensure_ascii=False) + "\n" for r in records)
    left_out = ", ".join(f"{n} {s}" for s, n in left.items() if n)
    if args.out == "-":
        sys.stdout.write(body)
    else:
        from memory.fileio import atomic_write_text

        atomic_write_text(Path(args.out), body)
        print(f"exported {len(records)} memories to {args.out}", file=sys.stderr)
    if left_out:
        print(f"left out by --status ({', '.join(tuple(args.status or default))}): {left_out}"
              + (" (memories become active when a training cycle publishes them)" if "pending" in left else ""),
              file=sys.stderr)
    return 0


def _as_json(r) -> dict:
    return {"id": r.id, "user_id": r.user_id, "status": r.status, "text": r.text, "source": r.source,
            "session_id": r.session_id, "message_index": r.message_index, "said_at": r.said_at,
            "created_at": r.created_at, "superseded_by": r.superseded_by}


if __name__ == "__main__":
    sys.exit(main())
