"""Chat with a published model that recalls its trained memories.

    python chat.py                                   # interactive; sessions saved to --chats_dir
    python chat.py --ask "Where do I live?"          # one answer, with what was recalled
    python chat.py --ask "Where do I live?" --user alex --output_dir output

Every turn is probed (--recall auto, the default): the <recall> query after the user's turn
searches the version's memory DB, and when the best memory reaches the version's calibrated
threshold its vector is injected at <|memory_pad|>, the model reads it back (checked against
the stored text: a span never shows anything but a stored memory) and answers from it. Below
the threshold the turn is answered by the model alone, with no recall. --recall force recalls
on every turn; --recall model waits for the model to emit <recall> by itself.
"""
import argparse
import datetime as dt
import logging
import sys
import uuid
from pathlib import Path

from memory.publish import VersionError
from recall.model_loading import ModelError


def _print_answer(answer, out=None) -> None:
    out = out or sys.stdout  # read at call time: a default bound at import would outlive a redirected stdout
    if not answer.recalls:
        best = "" if answer.probe is None else f" (best memory's score {answer.probe.score:.3f})"
        print(f"[no recall]{best}", file=out)
    for r in answer.recalls:
        if r.memory_id is None:
            score = "n/a" if r.score is None else f"{r.score:.3f}"
            print(f"[recall] nothing above the threshold (best score {score})", file=out)
            continue
        print(f"[recall] score {r.score:.3f} | {r.decoded}", file=out)
        if r.verified is False:
            print(f"[recall]   the model decoded this memory differently from token {r.diverged_at} on "
                  f"({r.model_token!r}); the stored text is shown", file=out)
    print(answer.final, file=out)


def main(argv=None) -> int:
    from memory.fileio import private_umask

    with private_umask():  # what this writes is the user's alone (0600 files, 0700 directories)
        return _main(argv)


def _main(argv=None) -> int:
    from memory.search import RETRIEVALS
    from recall.generation import CHAT_DEFAULTS, RECALL_MODES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output_dir", default=None,
                    help="work directory: its models/current version is used (as run_training.py --output_dir)")
    ap.add_argument("--model_dir", default=None,
                    help="a version directory, or a models/ directory (its 'current' is used); "
                         "default: OUTPUT_DIR/models, or output/models")
    ap.add_argument("--ask", default=None, help="answer this once and exit")
    ap.add_argument("--recall", choices=RECALL_MODES, default=CHAT_DEFAULTS.recall,
                    help="auto: probe every turn, recall when a memory reaches the threshold; force: recall on "
                         "every turn; model: only when the model emits <recall> itself")
    ap.add_argument("--force_recall", "--force-recall", dest="recall", action="store_const", const="force",
                    help="the same as --recall force")
    ap.add_argument("--user", default=None, help="whose memories to search (default: the version's default user)")
    ap.add_argument("--threshold", type=float, default=None, help="override the version's recall threshold")
    ap.add_argument("--retrieval", choices=RETRIEVALS, default=CHAT_DEFAULTS.retrieval,
                    help="which memory a recall reads: fused (<recall> and all-MiniLM-L6-v2 ranked together) or "
                         "recall (<recall> alone); the version's threshold on <recall> decides whether either way")
    ap.add_argument("--top_k", type=int, default=CHAT_DEFAULTS.top_k, help="memories searched per <recall>")
    ap.add_argument("--memories_per_recall", type=int, default=None,
                    help="of those, how many above the threshold are injected, each in its own recall span "
                         "(default: the version's memories_per_recall)")
    ap.add_argument("--max_new_tokens", type=int, default=CHAT_DEFAULTS.max_new_tokens)
    ap.add_argument("--no_repeat_ngram", type=int, default=CHAT_DEFAULTS.no_repeat_ngram,
                    help="never repeat an n-gram of the answer outside recall spans (0, the default: plain greedy)")
    ap.add_argument("--no_verify", dest="verify", action="store_false",
                    help="show the model's own decoding of each recalled memory, unchecked (diagnostics; by default "
                         "a span that differs from the stored memory shows the stored text, flagged)")
    ap.add_argument("--chats_dir", default="chats", help="where interactive sessions are saved ('' to not save)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from memory.search import make_search
    from memory.publish import open_version

    model_dir = args.model_dir or str(Path(args.output_dir or "output") / "models")
    try:
        model, db = open_version(model_dir, device=args.device, precision=args.precision)
    except (FileNotFoundError, VersionError, ModelError) as exc:
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
        search = make_search(db, user, max(args.top_k, per_recall), args.retrieval)
        n_active = db.count(user_id=user, statuses=("active",))
        gen = dict(recall=args.recall, max_new_tokens=args.max_new_tokens, threshold=threshold,
                   memories_per_recall=per_recall, no_repeat_ngram=args.no_repeat_ngram, verify=args.verify)
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
