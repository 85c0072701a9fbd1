"""``MemoryTrainingService``: orchestrates the design document's steps.

step 0  save chat sessions as JSON          -> ``save_chat_session`` (memory.chat_store)
step 1  load them                           -> ``load_chat_sessions``
step 2  extract memory entries              -> ``extract_memory_entries`` + ingestion into the DB
step 3  train: 3.1 the <recall> token       -> ``train_recall_token`` (memory.recall_step)
              3.2 memory decoding           -> ``train_memory_decoding`` (memory.decoding_step)
step 4  publish a model version             -> ``publish`` (memory.publish: models/model_*/, current)

Only new or changed sessions are extracted: the DB remembers each session's content
hash, written after its facts are stored, so a crash mid-run re-extracts at most the
sessions in flight (their facts then de-duplicate exactly).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import time
from pathlib import Path
from typing import List, Optional, Sequence

from memory.chat_store import ChatStore, LoadResult
from memory.config import MemoryArguments, ModelArguments
from memory.fileio import atomic_write_json
from memory.extraction import ExtractionConfig, ExtractionResult, extract_memory_entries
from memory.ingest import IngestReport, ingest_candidates
from memory.schema import ChatSession
from memory.vector_db import MemoryVectorDB

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunSummary:
    sessions_read: int = 0
    sessions_rejected: int = 0
    sessions_unchanged: int = 0
    sessions_extracted: int = 0
    memories_added: int = 0
    memories_duplicate: int = 0
    memories_superseded: int = 0
    memories_rejected: int = 0
    memories_imported: int = 0
    recall: Optional[dict] = None
    decoding: Optional[dict] = None
    version: Optional[str] = None
    rejected_by_reason: dict = dataclasses.field(default_factory=dict)
    stage_seconds: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    report_path: Optional[str] = None

    def lines(self) -> List[str]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected_by_reason.items())) or "none"
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items())
        return [
            f"sessions: {self.sessions_read} read, {self.sessions_rejected} rejected, "
            f"{self.sessions_unchanged} unchanged (skipped), {self.sessions_extracted} extracted",
            f"memories: {self.memories_added} added, {self.memories_duplicate} duplicate, "
            f"{self.memories_superseded} superseded, {self.memories_rejected} rejected ({reasons})"
            + (f", {self.memories_imported} imported" if self.memories_imported else ""),
            *([_recall_line(self.recall)] if self.recall else []),
            *([_decoding_line(self.decoding)] if self.decoding else []),
            *([f"published: {self.version}"] if self.version else []),
            f"time: {self.seconds:.1f}s ({stages})",
        ]


def _recall_line(m: dict) -> str:
    line = f"<recall> training: {m['memories']} memories, {m['cues']} cues"
    if "kfold" in m:
        k = m["kfold"]
        line += (f"; {k['k']}-fold held-out recall@1 {k['recall_at_1_mean']:.3f} ± {k['recall_at_1_std']:.3f}, "
                 f"recall@5 {k['recall_at_5_mean']:.3f}, MRR {k['mrr_mean']:.3f}")
    if "unseen" in m:
        line += f"; unseen memories recall@1 {m['unseen']['recall_at_1']:.3f}"
    return line


def _decoding_line(m: dict) -> str:
    return (f"memory decoding: exact match {m['decode_exact_match']:.3f} over {m['memories']} memories; "
            f"<recall> recall@1 on cues {m['recall_before']['recall_at_1']:.3f} before step 2, "
            f"{m['recall_after']['recall_at_1']:.3f} after; {m['train']['tokens_per_second']:.0f} tokens/s")


class MemoryTrainingService:
    def __init__(self, model_args: ModelArguments, args: MemoryArguments, train_args=None):
        from recall.text_embedding_train import RecallTrainingArguments

        self.model_args, self.args = model_args, args
        self.train_args = train_args or RecallTrainingArguments(output_dir="output")
        self.output_dir = Path(self.train_args.output_dir)
        self.store = ChatStore(args.chats_dir, default_user_id=args.default_user_id) if args.chats_dir else None
        self._loaded = None
        self._db: Optional[MemoryVectorDB] = None

    # ------------------------------------------------------------ resources
    @property
    def db(self) -> MemoryVectorDB:
        if self._db is None:
            self._db = MemoryVectorDB(self.output_dir / "memory_db")
        return self._db

    @property
    def loaded(self):
        if self._loaded is None:
            from recall.model_loading import load_model_and_tokenizer

            self._loaded = load_model_and_tokenizer(
                self.model_args.model_name_or_path, gguf_file=self.model_args.gguf_file,
                device=self.model_args.device, precision=self.model_args.precision)
        return self._loaded

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # ---------------------------------------------------------- steps 0 - 2
    def save_chat_session(self, session: ChatSession) -> Path:
        """Step 0: write one session to the chat store (atomic)."""
        return self.store.save_session(session)

    def load_chat_sessions(self) -> LoadResult:
        """Step 1: every valid session in the store; bad files are reported and skipped."""
        if self.store is None:
            return LoadResult([], [])
        return self.store.load_sessions(strict=self.args.strict)

    def import_memories(self, path: str) -> IngestReport:
        """``--memories FILE.jsonl``: entries stored as if extracted (same de-duplication)."""
        from memory.import_memories import read_memories_jsonl

        candidates = read_memories_jsonl(path, self.args.default_user_id)
        report = ingest_candidates(self.db, candidates, self.vectorizer(),
                                   near_duplicate_cosine=self.args.near_duplicate_cosine)
        self.db.flush()
        return report

    def train_recall_token(self, sessions: Sequence[ChatSession] = (), run_dir: Optional[Path] = None
                           ) -> Optional[dict]:
        """Step 3.1: train ``<recall>`` on every live memory (see memory.recall_step); the
        user turns of ``sessions`` serve as unlabelled texts for the teacher's KL term."""
        from memory.recall_step import train_recall_token

        run_dir = run_dir or self.new_run_dir()
        turns = [m.content for s in sessions for m in s.messages if m.role == "user" and len(m.content) < 2000]
        return train_recall_token(self.loaded, self.db, self.store, self.args, self.train_args, run_dir, turns)

    def sft_examples(self, sessions: Sequence[ChatSession] = ()) -> list:
        """Step 2's SFT data: ``--sft_data``, self-distilled answers, the sessions' replies."""
        from memory.sft_data import chat_session_examples, read_sft_jsonl, self_distilled
        from recall.model_loading import cache_root

        out = []
        if self.args.sft_data:
            out += read_sft_jsonl(self.args.sft_data)
        if self.args.sft_self_distill:
            lm = self.loaded
            out += self_distilled(lm.model, lm.tokenizer, lm.source.identity, cache_root() / "sft",
                                  autocast_dtype=lm.runtime.autocast_dtype)
        if self.args.sft_from_chats:
            out += chat_session_examples(sessions)
        return out

    def decoding_arguments(self, out_dir: Path):
        from recall.text_memory_train import MemoryDecodingArguments

        a, t = self.args, self.train_args
        return MemoryDecodingArguments(
            output_dir=str(out_dir), seed=t.seed, use_cpu=t.use_cpu, logging_steps=t.logging_steps,
            num_train_epochs=a.decode_epochs, learning_rate=a.decode_learning_rate,
            per_device_train_batch_size=a.decode_batch_size, lora_r=a.decode_lora_r,
            lora_alpha=a.decode_lora_alpha, lora_target_modules=a.decode_lora_target_modules,
            projector_hidden=a.decode_projector_hidden, max_length=a.decode_max_length,
            mix=a.decode_mix, recall_loss_weight=a.decode_recall_loss_weight, preserve_weight=a.decode_preserve_weight,
            kd_weight=a.decode_kd_weight, deepspeed=t.deepspeed,
            disable_tqdm=t.disable_tqdm)

    def train_memory_decoding(self, sessions: Sequence[ChatSession], run_dir: Path):
        """Step 3.2 on the memories step 3.1 trained (``run_dir/recall``); see memory.decoding_step."""
        from memory.cues import Cue
        from memory.decoding_step import train_memory_decoding

        recall_dir = run_dir / "recall"
        cfg = json.loads((recall_dir / "recall_config.json").read_text())
        records = [self.db.get(i) for i in cfg["memory_ids"]]
        cues = {r.id: [Cue("text", r.text)] + [c for c in map(Cue.decode, r.cues) if c.kind != "text"]
                for r in records}
        bank = self.db.vectors([r.id for r in records])
        out = run_dir / "decode"
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        sft = self.sft_examples(sessions)
        # reference texts for the projector's centre: the same encoder on general prompts
        reference = self.vectorizer().encode(sorted({e.prompt for e in sft})[:256])
        return train_memory_decoding(self.loaded, records, bank, cues, sft, recall_dir,
                                     self.decoding_arguments(out), out, reference_vectors=reference)

    def models_dir(self) -> Path:
        return Path(self.args.models_dir) if self.args.models_dir else self.output_dir / "models"

    def publish(self, result, run_dir: Path, recall_metrics: Optional[dict]) -> Path:
        """Step 4: activate the trained memories and publish model + DB snapshot as a version."""
        from memory.publish import publish_version
        from memory.token_manager import memory_token_ids
        from recall.published import save_recall_model
        from recall.text_embedding_train import ACTIVATION_PHRASE

        cfg = json.loads((run_dir / "recall" / "recall_config.json").read_text())
        pending = [r.id for r in self.db.records(statuses=("pending",)) if r.id in set(cfg["memory_ids"])]
        if pending:
            self.db.set_status(pending, "active")
        self.db.flush()
        metrics = {"recall": recall_metrics, "decoding": result.metrics}
        lm = self.loaded

        def write(tmp: Path) -> List[str]:
            files = save_recall_model(tmp, result.lm, lm.tokenizer, result.projector, result.query_projector, {
                "token_ids": memory_token_ids(lm.tokenizer), "activation_phrase": ACTIVATION_PHRASE,
                "recall_threshold": self.args.recall_threshold, "encoder_id": self.db.encoder_id,
                "default_user_id": self.args.default_user_id})
            files += [f"memory_db/{f}" for f in self.db.snapshot(tmp / "memory_db")]
            atomic_write_json(tmp / "metrics.json", metrics)
            return files + ["metrics.json"]

        manifest = {"base_model": lm.source.identity, "base_location": lm.source.location,
                    "base_gguf_file": lm.source.gguf_file, "run_dir": str(run_dir),
                    "memories": len(cfg["memory_ids"]), "encoder_id": self.db.encoder_id}
        return publish_version(self.models_dir(), write, manifest, retention=self.args.keep_versions)

    def new_run_dir(self) -> Path:
        """A fresh ``runs/<UTC timestamp>`` path (created by whatever first writes into it)."""
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d_%H%M%S_%f")
        return self.output_dir / "runs" / stamp

    def pending_sessions(self, sessions: List[ChatSession]) -> List[ChatSession]:
        return [s for s in sessions if self.db.session_state(s.session_id) != s.content_hash()]

    def extract_memory_entries(self, sessions: List[ChatSession]) -> ExtractionResult:
        """Step 2a: candidate facts from the base model (see memory.extraction)."""
        cfg = ExtractionConfig(unit=self.args.extraction_unit, constrained=self.args.extraction_constrained,
                               few_shot=self.args.extraction_few_shot, grounding=self.args.extraction_grounding,
                               batch_size=self.args.extraction_batch_size)
        lm = self.loaded
        return extract_memory_entries(lm.model, lm.tokenizer, sessions, cfg, lm.runtime.autocast_dtype)

    def vectorizer(self):
        from memory.vectors import build_vectorizer

        if not hasattr(self, "_vectorizer"):
            self._vectorizer = build_vectorizer(self.args.embedding_model, self.loaded, self.args.embedding_template)
        return self._vectorizer

    def store_memories(self, sessions: List[ChatSession], result: ExtractionResult) -> IngestReport:
        """Step 2b: de-duplicate, apply the update rule, store; then mark sessions processed."""
        report = ingest_candidates(self.db, result.candidates, self.vectorizer(),
                                   near_duplicate_cosine=self.args.near_duplicate_cosine)
        per_session = collections.Counter(c.session_id for c in result.candidates)
        for s in sessions:
            self.db.mark_session_processed(s.session_id, s.content_hash(), s.source_path or "",
                                           per_session.get(s.session_id, 0))
        self.db.flush()
        return report

    # ------------------------------------------------------------- the run
    def run_training(self, stage: Optional[str] = None) -> RunSummary:
        """Run the pipeline up to ``stage`` (``extract``: steps 0-2)."""
        from transformers import set_seed

        set_seed(self.train_args.seed)
        stage = stage or self.args.stage
        started = time.perf_counter()
        summary = RunSummary()
        timer = _StageTimer(summary)
        with timer("load"):
            loaded = self.load_chat_sessions()
        summary.sessions_read = len(loaded.sessions)
        summary.sessions_rejected = len(loaded.rejected)
        todo = self.pending_sessions(loaded.sessions)
        summary.sessions_unchanged = len(loaded.sessions) - len(todo)
        summary.sessions_extracted = len(todo)
        logger.info("step 1: %d sessions read, %d rejected, %d new or changed",
                    len(loaded.sessions), len(loaded.rejected), len(todo))
        extraction, ingest = None, IngestReport()
        if todo:
            with timer("extract"):
                extraction = self.extract_memory_entries(todo)
            with timer("store"):
                ingest = self.store_memories(todo, extraction)
        if self.args.memories:
            with timer("import"):
                imported = self.import_memories(self.args.memories)
            summary.memories_imported = len(imported.added)
            ingest.duplicate_exact += imported.duplicate_exact
            ingest.duplicate_near += imported.duplicate_near
            ingest.superseded += imported.superseded
            ingest.events += imported.events
        _fill_counts(summary, extraction, ingest)
        if stage in ("recall", "all"):
            run_dir = self.new_run_dir()
            with timer("recall"):
                summary.recall = self.train_recall_token(loaded.sessions, run_dir)
            if stage == "all" and summary.recall is not None:
                with timer("decode"):
                    result = self.train_memory_decoding(loaded.sessions, run_dir)
                summary.decoding = result.metrics
                with timer("publish"):
                    summary.version = str(self.publish(result, run_dir, summary.recall))
        summary.seconds = time.perf_counter() - started
        summary.report_path = str(self._write_report(summary, loaded, extraction, ingest))
        return summary

    def _write_report(self, summary, loaded, extraction, ingest) -> Path:
        reports = self.output_dir / "reports"
        reports.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        path = reports / f"extract-{stamp}.json"
        body = {
            "summary": dataclasses.asdict(summary),
            "rejected_sessions": [{"path": str(r.path), "reason": r.reason} for r in loaded.rejected],
            "rejected_facts": [dataclasses.asdict(r) for r in (extraction.rejected if extraction else [])],
            "events": ingest.events,
        }
        atomic_write_json(path, body)
        return path


def _fill_counts(summary: RunSummary, extraction: Optional[ExtractionResult], ingest: IngestReport) -> None:
    counts = ingest.counts()
    summary.memories_added = counts["added"]
    summary.memories_duplicate = counts["duplicate_exact"] + counts["duplicate_near"]
    summary.memories_superseded = counts["superseded"]
    if extraction:
        summary.memories_rejected = len(extraction.rejected)
        reasons = collections.Counter(r.reason.split(":")[0] for r in extraction.rejected)
        summary.rejected_by_reason = dict(reasons)


class _StageTimer:
    """``with timer("extract"): ...`` records the stage's wall time in the summary."""

    def __init__(self, summary: RunSummary):
        self.summary = summary

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.summary.stage_seconds[name] = time.perf_counter() - start
