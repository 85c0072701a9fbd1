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
import functools
import datetime as dt
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from memory.chat_store import ChatStore, LoadResult
from memory.config import MemoryArguments, ModelArguments
from memory.fileio import atomic_write_json
from memory.extraction import ExtractionConfig, ExtractionResult, extract_memory_entries
from memory.ingest import IngestReport, ingest_candidates
from memory.faults import crash_point
from memory.runs import (PLAN, MarkCompleteCheckpoints, ProgressCallback, RunDir, Status, StopAtStepEnd, check_stop,
                         find_unfinished)
from memory.schema import ChatSession
from recall.activation import is_activated
from recall.distributed import barrier, broadcast, is_main, main_first, without_zero3_init, world_size
from recall.lora_targets import resolve_targets
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
    memories_forgotten: int = 0  # proposed again after the user forgot them: not stored
    memories_already_stored: int = 0  # stored by an earlier read of the same session (it was edited)
    memories_rejected: int = 0
    memories_imported: int = 0
    recall: Optional[dict] = None
    decoding: Optional[dict] = None
    version: Optional[str] = None
    plan: Optional[dict] = None
    run_dir: Optional[str] = None
    resumed: Optional[str] = None
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
            + (f", {self.memories_imported} imported" if self.memories_imported else "")
            + (f", {self.memories_forgotten} forgotten before (not stored)" if self.memories_forgotten else "")
            + (f", {self.memories_already_stored} stored before" if self.memories_already_stored else ""),
            *([f"resumed unfinished run {self.resumed}"] if self.resumed else []),
            *([_plan_line(self.plan)] if self.plan else []),
            *([_recall_line(self.recall)] if self.recall else []),
            *([_decoding_line(self.decoding)] if self.decoding else []),
            *([f"published: {self.version}"] if self.version else []),
            f"time: {self.seconds:.1f}s ({stages})",
        ]


def _plan_line(p: dict) -> str:
    return (f"cycle: {p['mode']} ({p.get('reason')}); {p['memories']} memories trained "
            f"({p['new']} new, {p['replayed']} replayed)"
            + (f" from {Path(p['base_version']).name}" if p.get("base_version") else " from the base model"))


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
        self.status = Status(self.output_dir)

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
            from recall.model_loading import resolve_training_precision

            # the trainers' autocast follows the inference runtime on a CPU (--train_precision)
            self.train_args = resolve_training_precision(self.train_args, self._loaded.runtime,
                                                         self.model_args.train_precision)
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

    @property
    def secret_filter(self):
        """memory.secrets.SecretFilter of ``--secret_filter`` (None when off)."""
        if not hasattr(self, "_secret_filter"):
            from memory.secrets import secret_filter_for

            self._secret_filter = secret_filter_for(self.args.secret_filter)
        return self._secret_filter

    def import_memories(self, path: str) -> IngestReport:
        """``--memories FILE.jsonl``: entries stored as if extracted (same de-duplication)."""
        from memory.import_memories import read_memories_jsonl

        candidates = read_memories_jsonl(path, self.args.default_user_id)
        named = {c.session_id for c in candidates if c.session_id is not None}
        missing = sorted(s for s in named if self.store is None or not self.store.path_for(s).is_file())
        if missing:
            logger.warning("%s: %d of the sessions named by session_id are not in the chat store (%s), so those "
                           "memories get no source cue: %s", path, len(missing),
                           self.store.directory if self.store else "no --chats_dir", ", ".join(missing[:5]))
        report = ingest_candidates(self.db, candidates, self.vectorizer(),
                                   near_duplicate_cosine=self.args.near_duplicate_cosine,
                                   secret_filter=self.secret_filter)
        self.db.flush()
        return report

    def train_recall_token(self, sessions: Sequence[ChatSession] = (), run_dir: Optional[Path] = None,
                           plan: Optional[dict] = None, start=None) -> Optional[dict]:
        """Step 3.1: train ``<recall>`` (see memory.recall_step) on ``plan``'s memories against
        its bank (default: every live memory); the user turns of ``sessions`` serve as
        unlabelled texts for the teacher's KL term. ``start``: see ``_start_point``."""
        from memory.recall_step import train_recall_token

        run_dir = run_dir or self.new_run_dir()
        turns = [m.content for s in sessions for m in s.messages if m.role == "user" and len(m.content) < 2000]
        if self.args.recall_general_prompts:
            from memory.sft_data import read_prompts

            turns += read_prompts()
        plan = plan or {}
        loaded = self.loaded  # first: loading resolves the training precision into self.train_args
        return train_recall_token(loaded, self.db, self.store, self.args, self.train_args, run_dir, turns,
                                  bank_ids=plan.get("bank_ids"), train_ids=plan.get("memory_ids"),
                                  start_lm=start[0] if start else None, query_projector=start[2] if start else None,
                                  start_adapter=start[3] if start else None, callbacks=self._callbacks("recall"))

    def _callbacks(self, stage: str) -> list:
        return [StopAtStepEnd(), MarkCompleteCheckpoints(), ProgressCallback(self.status, stage)]

    def sft_examples(self, sessions: Sequence[ChatSession] = ()) -> list:
        """Step 2's SFT data: ``--sft_data``, self-distilled answers, the sessions' replies."""
        from memory.secrets import filter_texts
        from memory.sft_data import chat_session_examples, read_sft_data, self_distilled
        from recall.model_loading import cache_root

        out = []
        if self.args.sft_data:
            out += read_sft_data(self.args.sft_data)
        if self.args.sft_self_distill:
            lm = self.loaded
            out += self_distilled(lm.model, lm.tokenizer, lm.source.identity, cache_root() / "sft",
                                  autocast_dtype=lm.runtime.autocast_dtype)
        if self.args.sft_from_chats:
            pairs = chat_session_examples(sessions)
            keep = filter_texts([f"{e.prompt}\n{e.answer}" for e in pairs], self.secret_filter, "chat SFT examples")
            out += [e for e, k in zip(pairs, keep) if k]
        return out

    def decoding_arguments(self, out_dir: Path):
        from recall.text_memory_train import MemoryDecodingArguments

        self.loaded  # resolves the training precision (--train_precision)
        a, t = self.args, self.train_args
        return MemoryDecodingArguments(
            output_dir=str(out_dir), seed=t.seed, use_cpu=t.use_cpu, logging_steps=t.logging_steps,
            num_train_epochs=a.decode_epochs, min_steps=a.decode_min_steps, learning_rate=a.decode_learning_rate,
            per_device_train_batch_size=a.decode_batch_size, lora_r=a.decode_lora_r,
            lora_alpha=a.decode_lora_alpha,
            lora_target_modules=",".join(resolve_targets(self.loaded.model, a.decode_lora_target_modules, "decode")),
            projector_hidden=a.decode_projector_hidden, noise_std=a.decode_noise_std,
            max_length=a.decode_max_length,
            mix=a.decode_mix, neighbour_cosine=a.decode_neighbour_cosine, neighbour_samples=a.decode_neighbour_samples,
            recall_loss_weight=a.decode_recall_loss_weight, preserve_weight=a.decode_preserve_weight,
            kd_weight=a.decode_kd_weight, length_grouped=a.decode_length_grouped, packing=a.decode_packing,
            context_cache_mb=a.decode_context_cache_mb,
            stop_at_exact_match=a.decode_stop_at_exact_match, deepspeed=t.deepspeed,
            bf16=t.bf16, fp16=t.fp16,  # HF's --bf16/--fp16 (autocast) reach both trainers
            compile_layers=t.compile_layers, dataloader_num_workers=t.dataloader_num_workers,
            disable_tqdm=t.disable_tqdm)

    def train_memory_decoding(self, sessions: Sequence[ChatSession], run_dir: Path, plan: Optional[dict] = None,
                              start=None):
        """Step 3.2 on the memories step 3.1 trained (``run_dir/recall``); see memory.decoding_step."""
        from memory.cues import memory_cues
        from memory.decoding_step import train_memory_decoding

        recall_dir = run_dir / "recall"
        cfg = json.loads((recall_dir / "recall_config.json").read_text())
        records = [self.db.get(i) for i in cfg["memory_ids"]]
        cues = memory_cues(records, templates=self.args.cue_templates)
        bank = self.db.vectors([r.id for r in records])
        out = run_dir / "decode"
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        with main_first(), without_zero3_init():  # rank 0 generates (and caches) the self-distilled answers
            sft = self.sft_examples(sessions)
        # reference texts for the projector's centre: the same encoder on general prompts
        reference = self.vectorizer().encode(sorted({e.prompt for e in sft})[:256])
        return train_memory_decoding(self.loaded, records, bank, cues, sft, recall_dir,
                                     self.decoding_arguments(out), out, reference_vectors=reference,
                                     start_lm=start[0] if start else None,
                                     start_projector=start[1] if start else None,
                                     callbacks=self._callbacks("decode"))

    def models_dir(self) -> Path:
        return (Path(self.args.models_dir) if self.args.models_dir else self.output_dir / "models").absolute()

    def _save_decoded(self, result, run: RunDir) -> None:
        """The trained version, complete, in ``run/decode/model`` (then ``decode/metrics.json``),
        so publishing can be redone after a crash without training again."""
        from memory.token_manager import memory_token_ids
        from recall.published import save_recall_model
        from recall.text_embedding_train import ACTIVATION_PHRASE

        lm = self.loaded
        final, tmp = run.path / "decode" / "model", run.path / "decode" / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, mode=0o700)
        save_recall_model(tmp, result.lm, lm.tokenizer, result.projector, result.query_projector, {
            "token_ids": memory_token_ids(lm.tokenizer), "activation_phrase": ACTIVATION_PHRASE,
            "recall_threshold": self.recall_threshold(result.metrics), "encoder_id": self.db.encoder_id,
            "default_user_id": self.args.default_user_id, "memories_per_recall": self.args.memories_per_recall})
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        atomic_write_json(run.path / "decode" / "metrics.json", result.metrics)

    def recall_threshold(self, decoding_metrics: dict) -> float:
        """The version's recall threshold: ``--recall_threshold``, or step 2's calibration for 'auto'."""
        if self.args.recall_threshold != "auto":
            return float(self.args.recall_threshold)
        calibrated = (decoding_metrics.get("threshold") or {}).get("value")
        if calibrated is None:
            logger.warning("recall_threshold auto: step 2 measured no calibration; using 0.5")
            return 0.5
        return float(calibrated)

    def publish(self, result, run_dir: Path, recall_metrics: Optional[dict]) -> Path:
        """Step 4 for a decoding result held in memory (used by benchmarks): save, then publish."""
        run = RunDir(run_dir)
        self._save_decoded(result, run)
        return self.publish_run(run, recall_metrics)

    def publish_run(self, run: RunDir, recall_metrics: Optional[dict]) -> Optional[Path]:
        """Step 4: publish ``run/decode/model`` + a DB snapshot (this run's memories active in
        it) as a version, switch ``current``, then activate the memories in the live DB.
        Idempotent: a crash after the switch is finished on the next run. A memory the run
        trained on that is forgotten before the snapshot is taken retires the run (nothing is
        published; returns None); one forgotten between the snapshot and the switch is erased
        from the new version's snapshot, and the next cycle retrains without it."""
        from memory.publish import publish_version

        plan = run.plan if (run.path / PLAN).is_file() else {}
        cfg = json.loads((run.path / "recall" / "recall_config.json").read_text())
        trained = plan.get("memory_ids") or cfg["memory_ids"]
        current, current_manifest = self.current_manifest()
        if current_manifest.get("run_dir") == str(run.path.absolute()):
            version = current
            logger.info("%s was already published as %s; finishing", run.path, version.name)
        else:
            metrics = {"recall": recall_metrics, "decoding": json.loads((run.path / "decode" / "metrics.json").read_text())}
            lm = self.loaded
            manifest = {"base_model": lm.source.identity, "base_location": lm.source.location,
                        "base_gguf_file": lm.source.gguf_file, "run_dir": str(run.path.absolute()),
                        "memories": len(cfg["memory_ids"]), "encoder_id": self.db.encoder_id,
                        "mode": plan.get("mode", "full"), "new": len(plan.get("new_ids", [])),
                        "replayed": len(plan.get("replay_ids", [])), "base_version": plan.get("base_version"),
                        "adapter_scope": cfg.get("adapter_scope", "all")}
            writer = functools.partial(self._write_version, run.path / "decode" / "model", set(trained), manifest, metrics)
            try:
                version = publish_version(self.models_dir(), writer, manifest, retention=self.args.keep_versions)
            except _ForgottenDuringRun as gone:
                run.mark("abandoned", {"reason": f"memories {gone.ids[:10]} were forgotten before publishing"})
                logger.warning("%s: memories %s were forgotten during the run; nothing published (the next cycle "
                               "trains without them)", run.path, gone.ids[:10])
                return None
            crash_point("published")
            self._erase_forgotten(version, trained)
        pending = [r.id for r in self.db.records(statuses=("pending",)) if r.id in set(trained)]
        if pending:
            self.db.set_status(pending, "active")
        self.db.flush()
        if (run.path / PLAN).is_file():
            run.mark("publish", {"version": str(version)})
            shutil.rmtree(run.path / "decode" / "model", ignore_errors=True)  # the version holds it now
        return version

    def _write_version(self, source: Path, trained: set, manifest: dict, metrics: dict, tmp: Path) -> List[str]:
        """publish_version's ``write``: the model's files, a snapshot of the live DB with this
        run's memories active, and the metrics. Raises _ForgottenDuringRun when the snapshot
        shows a trained memory forgotten."""
        files = [str(p.relative_to(source)) for p in sorted(source.rglob("*")) if p.is_file()]
        for f in files:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(source / f, tmp / f)
        files += [f"memory_db/{f}" for f in self.db.snapshot(tmp / "memory_db")]
        with MemoryVectorDB(tmp / "memory_db") as snap:  # this run's memories are what the version knows
            gone = sorted(r.id for r in snap.records(statuses=("deleted",)) if r.id in trained)
            if gone:
                raise _ForgottenDuringRun(gone)
            ids = [r.id for r in snap.records(statuses=("pending",)) if r.id in trained]
            if ids:
                snap.set_status(ids, "active")
            known = [r.id for r in snap.records(statuses=("active",))]
        manifest["memory_ids"] = known  # read by the next plan (forgotten memories force a full retrain)
        atomic_write_json(tmp / "metrics.json", metrics)
        return files + ["metrics.json"]

    def _erase_forgotten(self, version: Path, trained: Sequence[int]) -> None:
        """Memories forgotten after the snapshot was taken but before ``current`` switched
        (``python -m memory forget`` did not see this version yet): erase them from it too."""
        from memory.publish import forget_in_version

        late = self.forgotten_since({"memory_ids": trained})
        if late and forget_in_version(version, late):
            logger.warning("%s: memories %s were forgotten while it was published; erased from its memory DB, and "
                           "the next cycle retrains without them", version, late[:10])

    def _config_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model_args), "memory": dataclasses.asdict(self.args),
                "training": self.train_args.to_dict()}

    def new_run_dir(self) -> Path:
        """A fresh ``runs/<UTC timestamp>`` path (created by whatever first writes into it)."""
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d_%H%M%S_%f")
        return self.output_dir.absolute() / "runs" / stamp

    def pending_sessions(self, sessions: List[ChatSession]) -> List[ChatSession]:
        return [s for s in sessions if self.db.session_state(s.session_id) != s.content_hash()]

    def extract_memory_entries(self, sessions: List[ChatSession]) -> ExtractionResult:
        """Step 2a: candidate facts (see memory.extraction and memory.rewrite)."""
        cfg = ExtractionConfig(method=self.args.extraction_method, unit=self.args.extraction_unit,
                               constrained=self.args.extraction_constrained,
                               few_shot=self.args.extraction_few_shot, grounding=self.args.extraction_grounding,
                               batch_size=self.args.extraction_batch_size,
                               max_per_message=self.args.max_memories_per_message,
                               max_per_session=self.args.max_memories_per_session)
        lm = self.loaded
        return extract_memory_entries(lm.model, lm.tokenizer, sessions, cfg, lm.runtime.autocast_dtype)

    def vectorizer(self):
        from memory.vectors import build_vectorizer

        if not hasattr(self, "_vectorizer"):
            self._vectorizer = build_vectorizer(self.args.embedding_model, self.loaded, self.args.embedding_template)
        return self._vectorizer

    def store_memories(self, sessions: List[ChatSession], result: ExtractionResult) -> IngestReport:
        """Step 2b: de-duplicate, apply the update rule, store, and mark the sessions processed,
        all in one transaction: a crash anywhere leaves a DB that the rerun completes exactly."""
        per_session = collections.Counter(c.session_id for c in result.candidates)

        def mark_processed() -> None:
            for s in sessions:
                self.db.mark_session_processed(s.session_id, s.content_hash(), s.source_path or "",
                                               per_session.get(s.session_id, 0))

        report = ingest_candidates(self.db, result.candidates, self.vectorizer(),
                                   near_duplicate_cosine=self.args.near_duplicate_cosine,
                                   secret_filter=self.secret_filter, finish=mark_processed)
        self.db.flush()
        return report

    # ------------------------------------------------------------- the run
    def run_training(self, stage: Optional[str] = None) -> RunSummary:
        """Run the pipeline up to ``stage`` (``extract``: steps 0-2; ``recall``: + step 3.1;
        ``all``: + step 3.2 and publishing). With ``all``, an unfinished run in
        ``OUTPUT_DIR/runs`` (a crash, a SIGTERM) is resumed first: from its first missing
        stage, and inside a stage from its newest Trainer checkpoint. Sessions that arrived
        meanwhile wait for the next cycle."""
        from transformers import set_seed

        set_seed(self.train_args.seed)
        stage = stage or self.args.stage
        started = time.perf_counter()
        summary = RunSummary()
        timer = _StageTimer(summary)
        run = find_unfinished(self.output_dir / "runs") if stage == "all" and is_main() else None
        loaded, extraction, ingest = LoadResult([], []), None, IngestReport()
        if run is not None:
            summary.resumed = run.run_id
            logger.info("resuming unfinished run %s (completed: %s)", run.path, ", ".join(run.completed()) or "none")
            with timer("load"):
                loaded = self.load_chat_sessions()
        elif is_main():  # under a launcher, rank 0 alone reads, extracts, writes the DB and plans
            loaded, extraction, ingest = self._ingest(summary, timer)
            if stage != "extract":
                check_stop("planning")
                plan = self.plan_cycle(loaded.sessions, stage)
                if plan is not None:
                    run = RunDir.create(self.new_run_dir(), plan, self._config_dict())
                    crash_point("planned")
        if world_size() > 1 and stage != "extract":
            path = broadcast(None if run is None else str(run.path))
            run = None if path is None else RunDir(Path(path))
            if run is not None and not is_main():
                loaded = self.load_chat_sessions()
        if run is not None:
            self.status.update(state="training", pid=os.getpid(), run_dir=str(run.path), stage="plan", progress=None)
            with _run_log(run.path / "run.log"):
                self._execute(run, stage, loaded.sessions, summary, timer)
        summary.seconds = time.perf_counter() - started
        if is_main():
            summary.report_path = str(self._write_report(summary, loaded, extraction, ingest))
        return summary

    def _ingest(self, summary: RunSummary, timer) -> tuple:
        """Steps 0-2: load the store, extract new or changed sessions, store their facts."""
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
            self.status.update(stage="extract", progress={"sessions": len(todo)})
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
            ingest.forgotten += imported.forgotten
            ingest.already_stored += imported.already_stored
            ingest.events += imported.events
        _fill_counts(summary, extraction, ingest)
        self._new_session_ids = [s.session_id for s in todo]
        return loaded, extraction, ingest

    # ----------------------------------------------------------- planning
    def current_version(self) -> Optional[Path]:
        from memory.publish import VersionError, resolve_current

        try:
            return resolve_current(self.models_dir())
        except VersionError:
            return None

    def current_manifest(self) -> Tuple[Optional[Path], dict]:
        """``(current version or None, its manifest or {})``."""
        from memory.publish import MANIFEST

        current = self.current_version()
        return current, json.loads((current / MANIFEST).read_text()) if current else {}

    def plan_cycle(self, sessions: Sequence[ChatSession], stage: str = "all") -> Optional[dict]:
        """Which memories this cycle trains, from what, or None when there is nothing to do.

        *Incremental* (the default once a version is published): the current version is
        trained further on the new (pending) memories plus a replay sample of older active
        ones (``replay_ratio`` per new memory, at most ``replay_cap``), against a bank of
        every live memory, so a cycle costs new + replay, not everything.
        *Full* (``--full``, no published version, another base model, encoder or adapter
        scope, or a memory of the current version was forgotten): from the base model on every
        live memory; a forgotten memory must not survive in the weights. With ``--incremental
        auto`` (the default) also when a full retrain costs no more step-2 optimizer steps than
        the incremental cycle would (step 2's step floor makes small stores cost the same either
        way), and for an activated adapter, whose continued cycles measured worse at keeping
        old memories (README, "Incremental cycles and replay")."""
        live = self.db.records(statuses=("pending", "active"))
        if not live:
            logger.warning("no memories in the store: nothing to train")
            return None
        pending = [r.id for r in live if r.status == "pending"]
        active = [r.id for r in live if r.status == "active"]
        current, manifest = self.current_manifest()
        reason = None
        if self.args.full:
            reason = "--full"
        elif current is None:
            reason = "no published version yet"
        elif manifest.get("base_model") != self.loaded.source.identity:
            reason = f"base model changed ({manifest.get('base_model')} -> {self.loaded.source.identity})"
        elif manifest.get("encoder_id") != self.db.encoder_id:
            reason = "memory encoder changed"
        elif manifest.get("adapter_scope", "all") != self.train_args.adapter_scope:
            reason = f"adapter scope changed ({manifest.get('adapter_scope', 'all')} -> {self.train_args.adapter_scope})"
        else:
            forgotten = self.forgotten_since(manifest)
            if forgotten:
                reason = f"{len(forgotten)} memories of the current version were forgotten"
        new_sessions = getattr(self, "_new_session_ids", [])
        base = {"stage": stage, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                "bank_ids": [r.id for r in live]}

        def full(why):
            logger.info("planning a full retrain from the base model on %d memories: %s", len(live), why)
            return {**base, "mode": "full", "reason": why, "base_version": None,
                    "memory_ids": [r.id for r in live], "new_ids": pending, "replay_ids": [],
                    "session_ids": [s.session_id for s in sessions]}

        if reason is not None:
            return full(reason)
        if not pending:
            logger.info("no new memories since %s: nothing to train", current.name)
            return None
        if self.args.incremental == "auto" and self.train_args.adapter_scope == "recall":
            return full("an activated adapter is retrained in full (--incremental auto: continuing it lost old "
                        "memories in bench.incremental; --incremental always continues it)")
        rng = random.Random(f"{self.train_args.seed}:{','.join(map(str, pending))}")
        n_replay = min(len(active), self.args.replay_cap, math.ceil(self.args.replay_ratio * len(pending)))
        if self.args.incremental == "auto":  # a full retrain is better (no drift, every memory): take it when no dearer
            steps_full, steps_cycle = (self._decode_steps(n) for n in (len(live), len(pending) + n_replay))
            if steps_full <= steps_cycle:
                return full(f"a full retrain costs no more ({steps_full} step-2 steps for {len(live)} memories; an "
                            f"incremental cycle {steps_cycle})")
        replay = sorted(rng.sample(active, n_replay))
        logger.info("planning an incremental cycle on %s: %d new memories + %d replayed (of %d active)",
                    current.name, len(pending), len(replay), len(active))
        return {**base, "mode": "incremental", "reason": f"{len(pending)} new memories",
                "base_version": str(current), "memory_ids": sorted(pending + replay), "new_ids": pending,
                "replay_ids": replay, "session_ids": list(new_sessions)}

    def _decode_steps(self, memories: int) -> int:
        """Step 2's optimizer steps for a cycle of ``memories`` memories (see decoding_step.planned_steps)."""
        from types import SimpleNamespace

        from memory.decoding_step import planned_steps

        a = self.args
        schedule = SimpleNamespace(per_device_train_batch_size=a.decode_batch_size, gradient_accumulation_steps=1,
                                   num_train_epochs=a.decode_epochs, min_steps=a.decode_min_steps, mix=a.decode_mix)
        return planned_steps(memories, schedule, self.train_args.adapter_scope == "recall")

    def forgotten_since(self, manifest: dict) -> List[int]:
        """Memories the version was trained on (its ``memory_ids``) that are deleted now."""
        ids = manifest.get("memory_ids") or []
        gone = set(r.id for r in self.db.records(statuses=("deleted",)))
        return [i for i in ids if i in gone]

    def waiting(self) -> dict:
        """What a cycle would find: new or changed sessions, new memories, and whether a full
        retrain is owed (a forgotten memory); cheap (no model is loaded)."""
        sessions = self.load_chat_sessions().sessions if self.store else []
        current, manifest = self.current_manifest()
        forgotten = self.forgotten_since(manifest)
        return {"sessions": len(self.pending_sessions(sessions)), "memories": self.db.count(statuses=("pending",)),
                "forgotten": len(forgotten), "unfinished_run": find_unfinished(self.output_dir / "runs") is not None,
                "unpublished": current is None and self.db.count(statuses=("pending", "active")) > 0}

    # ----------------------------------------------------------- executing a plan
    def _execute(self, run: RunDir, stage: str, sessions: Sequence[ChatSession], summary: RunSummary, timer) -> None:
        plan = run.plan
        summary.plan = {**{k: v for k, v in plan.items() if not k.endswith("_ids")},
                        "memories": len(plan["memory_ids"]), "new": len(plan["new_ids"]),
                        "replayed": len(plan["replay_ids"])}
        summary.run_dir = str(run.path)
        gone = [i for i in plan["memory_ids"] if self.db.get(i).status == "deleted"]
        if gone:
            run.mark("abandoned", {"reason": f"memories {gone[:10]} were forgotten before publishing"})
            logger.warning("%s: memories %s were forgotten during the run; discarding it (the next cycle replans)",
                           run.path, gone[:10])
            return
        ids = set(plan.get("session_ids") or [])
        used = [s for s in sessions if s.session_id in ids]
        start = self._start_point(plan)
        if not run.done("recall"):
            check_stop("step 3.1")
            self.status.update(stage="recall", progress=None)
            with timer("recall"):
                self.train_recall_token(used, run.path, plan=plan, start=start)
            crash_point("recall-trained")
            if is_main():
                run.mark("recall")
            barrier()  # step 3.2 reads what rank 0 wrote
        summary.recall = json.loads((run.path / "recall" / "metrics.json").read_text())
        if stage != "all":
            return
        if not run.done("decode"):
            check_stop("step 3.2")
            self.status.update(stage="decode", progress=None)
            with timer("decode"):
                result = self.train_memory_decoding(used, run.path, plan=plan, start=start)
                if is_main():
                    with without_zero3_init():  # a plain model, saved by rank 0 alone
                        self._save_decoded(result, run)
            crash_point("decoded")
            if is_main():
                run.mark("decode")
            barrier()
        summary.decoding = json.loads((run.path / "decode" / "metrics.json").read_text())
        check_stop("publishing")
        if is_main():
            self.status.update(stage="publish", progress=None)
            with timer("publish"):
                version = self.publish_run(run, summary.recall)
                summary.version = None if version is None else str(version)
        barrier()

    def _start_point(self, plan: dict):
        """None (the base model) or the current version's (lm, projector, query projector,
        adapter): for an activated version, lm is its base checkpoint and adapter its memory
        adapter's LoRA tensors, which the cycle continues; for a merged one adapter is None."""
        if plan["mode"] != "incremental":
            return None
        from recall.published import load_recall_model

        version = Path(plan["base_version"])
        if not version.is_dir():
            raise FileNotFoundError(f"{version}: the version this incremental run started from is gone "
                                    "(retention?); rerun with --full")
        model = load_recall_model(version, device=self.model_args.device, precision=self.model_args.precision)
        from memory.token_manager import add_memory_tokens

        ids = add_memory_tokens(self.loaded.model, self.loaded.tokenizer)
        if dict(model.config["token_ids"]) != dict(ids):
            raise ValueError(f"{version}: memory token ids {model.config['token_ids']} differ from the base "
                             f"model's {ids}; rerun with --full")
        engine = model.engine
        if is_activated(engine.lm):  # the base checkpoint (memory-token rows in it) and the adapter to continue
            adapter = {k: v.detach().clone() for k, v in engine.lm.named_parameters() if ".lora_" in k}
            return engine.lm.unload(), engine.projector, engine.query_projector, adapter
        return engine.lm, engine.projector, engine.query_projector, None

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
    summary.memories_forgotten = counts["forgotten"]
    summary.memories_already_stored = counts["already_stored"]
    if extraction:
        summary.memories_rejected = len(extraction.rejected)
        reasons = collections.Counter(r.reason.split(":")[0] for r in extraction.rejected)
        summary.rejected_by_reason = dict(reasons)


@contextlib.contextmanager
def _run_log(path: Path):
    """Everything logged while a run executes is also appended to ``runs/<id>/run.log``."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (instant, no extra disk) when on the same file system, else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class _ForgottenDuringRun(Exception):
    """A memory the run trained on was forgotten before its version was published."""

    def __init__(self, ids: List[int]):
        super().__init__(f"memories {ids[:10]} were forgotten")
        self.ids = ids


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
