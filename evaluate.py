"""Evaluate retrieval of the newest trained state in a work directory.

    python evaluate.py --output_dir output --questions examples/questions.json [--report report.json]

A question is a hit@k when one of the top-k retrieved memories (of the question's user,
pending or active) contains ``expected`` (case-insensitive). Baselines in the same run:
the untrained base model's last-token vector (PromptEOL, as the keys) and all-MiniLM-L6-v2.
"""
import argparse
import json
import logging
import sys
from pathlib import Path

from memory.evaluation import QuestionsFormatError, evaluate_retrieval, find_model_dir, format_table
from memory.sft_data import SFTFormatError, read_prompts


def main(argv=None) -> int:
    from memory.fileio import private_umask

    with private_umask():  # what this writes is the user's alone (0600 files, 0700 directories)
        return _main(argv)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output_dir", required=True, help="work directory (memory DB, runs/)")
    ap.add_argument("--questions", required=True, help='JSON list of {"question", "expected", "user_id"?}')
    ap.add_argument("--model_dir", default=None, help="a specific trained state (default: the newest)")
    ap.add_argument("--report", default=None, help="write the report JSON here")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--memories_per_recall", type=int, default=None,
                    help="memories injected per <recall> in the answer figures (default: the version's)")
    ap.add_argument("--general_prompts", default=None,
                    help="JSON list of general prompts no memory answers, for the false-recall and forgetting "
                         "figures (default: memory/data/heldout_prompts.json, never trained on)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        prompts = read_prompts(Path(args.general_prompts)) if args.general_prompts else None
        model_dir = args.model_dir or find_model_dir(args.output_dir)
        report = evaluate_retrieval(args.output_dir, model_dir, args.questions, device=args.device,
                                    precision=args.precision, memories_per_recall=args.memories_per_recall,
                                    heldout_prompts=prompts, heldout_source=args.general_prompts)
    except (QuestionsFormatError, SFTFormatError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(report))
    if args.report:
        with open(args.report, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
