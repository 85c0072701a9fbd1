"""Chat with a published model that recalls its trained memories.

    python chat.py                                   # interactive; sessions saved to --chats_dir
    python chat.py --ask "Where do I live?"          # one answer, with what was recalled
    python chat.py --ask "Where do I live?" --force-recall --user alex

The model generates; when it emits <recall>, that position's hidden state searches the
version's memory DB, the best memory's vector is injected at <|memory_pad|>, and the
model decodes the memory and continues. Below --threshold nothing is injected and the
model is told nothing was found. --force-recall starts every answer with the activation
phrase and <recall> (a 135M model rarely asks on its own; see README).
"""
import argparse
import datetime as dt
import logging
import sys
import uuid

from memory.publish import VersionError


def _print_answer(answer, out=None) -> None:
    out = out or sys.stdout  # read at call time: a default bound at import would outlive a redirected stdout
    if not answer.recalls:
        print("[no recall]", file=out)
    for r in answer.recalls:
        if r.memory_id is None:
            score = "n/a" if r.score is None else f"{r.score:.3f}"
            print(f"[recall] nothing above the threshold (best score {score})", file=out)
        else:
            print(f"[recall] score {r.score:.3f} | stored: {r.stored_text} | decoded: {r.decoded}", file=out)
    print(answer.final, file=out)


def main(argv=None) -> int:
    from memory.fileio import private_umask

    with private_umask():  # what this writes is the user's alone (0600 files, 0700 directories)
        return _main(argv)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_dir", default="output/models",
                    help="a version directory, or a models/ directory (its 'current' is used)")
    ap.add_argument("--ask", default=None, help="answer this once and exit")
    ap.add_argument("--force-recall", dest="force_recall", action="store_true")
    ap.add_argument("--user", default=None, help="whose memories to search (default: the version's default user)")
    ap.add_argument("--threshold", type=float, default=None, help="override the version's recall threshold")
    ap.add_argument("--top_k", type=int, default=3, help="memories searched per <recall>")
    ap.add_argument("--memories_per_recall", type=int, default=None,
                    help="of those, how many above the threshold are injected, each in its own recall span "
                         "(default: the version's memories_per_recall)")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--no_repeat_ngram", type=int, default=None,
                    help="never repeat an n-gram of the answer outside recall spans (default: "
                         "recall.generation.NO_REPEAT_NGRAM; 0: off)")
    ap.add_argument("--chats_dir", default="chats", help="where interactive sessions are saved ('' to not save)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from recall.published import db_search, open_version

    try:
        model, db = open_version(args.model_dir, device=args.device, precision=args.precision)
    except (FileNotFoundError, VersionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        user = args.user or model.config.get("default_user_id", "default")
        threshold = model.config.get("recall_threshold", 0.5) if args.threshold is None else args.threshold
        per_recall = int(model.config.get("memories_per_recall", 1) if args.memories_per_recall is None
                         else args.memories_per_recall)
        if per_recall < 1:
            print(f"error: --memories_per_recall must be >= 1, got {per_recall}", file=sys.stderr)
            return 1
        search = db_search(db, user, max(args.top_k, per_recall))
        n_active = db.count(user_id=user, statuses=("active",))
        from recall.generation import NO_REPEAT_NGRAM

        gen = dict(force_recall=args.force_recall, max_new_tokens=args.max_new_tokens, threshold=threshold,
                   memories_per_recall=per_recall,
                   no_repeat_ngram=NO_REPEAT_NGRAM if args.no_repeat_ngram is None else args.no_repeat_ngram)
        if args.ask is not None:
            if n_active == 0:
                print(f"[memory is empty for user {user!r}: answering without recall]")
            [answer] = model.engine.generate([args.ask], search, **gen)
            _print_answer(answer)
            return 0
        return _interactive(model, search, gen, user, args.chats_dir, n_active)
    finally:
        db.close()


def _interactive(model, search, gen, user, chats_dir, n_active) -> int:
    from memory.chat_store import ChatStore
    from memory.schema import ChatMessage, ChatSession

    print(f"model {model.path.name}, user {user!r}, {n_active} active memories. Empty line or Ctrl-D to quit.")
    history, messages = [], []
    now = lambda: dt.datetime.now(dt.timezone.utc).isoformat()  # noqa: E731
    started = now()
    try:
        while True:
            try:
                text = input("you> ").strip()
            except EOFError:
                break
            if not text:
                break
            [answer] = model.engine.generate([text], search, history=history, **gen)
            _print_answer(answer)
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer.final}]
            messages += [ChatMessage("user", text, now()), ChatMessage("assistant", answer.final, now())]
    except KeyboardInterrupt:
        print()
    if chats_dir and messages:
        session = ChatSession(f"chat-{dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}", user, started, messages)
        path = ChatStore(chats_dir, default_user_id=user).save_session(session)
        print(f"session saved to {path} (run_training.py --chats_dir {chats_dir} trains on it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
