"""Run the memory pipeline: load chat sessions, extract memories, train <recall>, train memory
decoding, publish a model version (steps 0-4 of the design document).

    python run_training.py                              # embedded default model, sample chats
    python run_training.py --config configs/default.yaml --chats_dir my_chats --stage extract
    python run_training.py --memories facts.jsonl --chats_dir "" --stage recall
"""
import logging
import sys

from memory.chat_store import ChatFormatError
from memory.config import parse_args
from memory.sft_data import SFTFormatError
from memory.training_service import MemoryTrainingService
from recall.model_loading import ModelNotFoundError


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_args, args, train_args = parse_args(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    service = MemoryTrainingService(model_args, args, train_args)
    try:
        summary = service.run_training()
    except (ChatFormatError, ModelNotFoundError, SFTFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        service.close()
    print("\n".join(summary.lines()))
    print(f"report: {summary.report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
