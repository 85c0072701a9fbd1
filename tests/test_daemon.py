"""The training service as a daemon: incremental cycles, resuming after kill -9 and SIGTERM,
the training lock, sessions arriving mid-cycle, failed cycles, and the memory CLI.

Real processes (``run_training.py`` / ``--daemon`` / ``python -m memory``) on the tiny random
model; a crash is a real SIGKILL, either from outside or self-inflicted at a named point
(``RECALL_MEMORY_CRASH_AT``, see memory.faults.crash_point)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import run_training
from memory.publish import MANIFEST, resolve_current
from memory.vector_db import MemoryVectorDB

ROOT = Path(__file__).resolve().parents[1]
FIRST = ["The user lives in Porto.", "The user has a dog named Max.", "The user works as a nurse."]
SECOND = ["The user plays the cello.", "The user is learning Japanese."]


def _files(tmp_path: Path) -> dict:
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in [
        ("Say hi.", "Hi there!"), ("Name a colour.", "Blue."), ("Count to three.", "One, two, three.")]) + "\n")
    out = {"sft": sft}
    for name, facts in (("first", FIRST), ("second", SECOND)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t, "user_id": "alex"}) + "\n" for t in facts))
        out[name] = path
    return out


def _flags(tiny_model_dir, tmp_path, out: Path, epochs: int = 1, chats: str = "") -> list:
    return ["--model_name_or_path", str(tiny_model_dir), "--chats_dir", chats, "--precision", "fp32",
            "--output_dir", str(out), "--num_train_epochs", str(epochs), "--per_device_train_batch_size", "4",
            "--lora_r", "4", "--cue_questions", "1", "--k_folds", "0", "--sft_data", str(tmp_path / "sft.jsonl"),
            "--sft_self_distill", "false", "--decode_epochs", str(epochs), "--decode_min_steps", "0", "--decode_lora_r", "4",
            "--decode_projector_hidden", "32", "--disable_tqdm", "true", "--logging_steps", "1"]


_STARTED = []


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    """A failing test must not leave a daemon or a trainer running."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _cli(args, env=None, **kw) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)
    _STARTED.append(proc)
    return proc


def _run_cli(args, env=None, timeout=180) -> subprocess.CompletedProcess:
    proc = _cli(args, env)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(args, proc.returncode, out)


def _wait(predicate, timeout=120, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _status(out: Path) -> dict:
    try:
        return json.loads((out / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _state(out: Path) -> dict:
    """What must match an uninterrupted run: active memories in the live DB and in the
    current version's snapshot, the version's manifest, no pending leftovers."""
    from transformers import AutoModelForCausalLM

    with MemoryVectorDB(out / "memory_db") as db:
        live = sorted(r.text for r in db.records(statuses=("active",)))
        pending = db.count(statuses=("pending",))
    current = resolve_current(out / "models")
    with MemoryVectorDB(current / "memory_db") as db:
        snap = sorted(r.text for r in db.records(statuses=("active",)))
    AutoModelForCausalLM.from_pretrained(current)  # loadable
    manifest = json.loads((current / MANIFEST).read_text())
    return {"live": live, "snapshot": snap, "pending": pending, "memories": manifest["memories"],
            "mode": manifest["mode"]}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """The uninterrupted run every crashed-and-resumed run must end up equal to."""
    tmp = tmp_path_factory.mktemp("reference")
    f = _files(tmp)
    assert run_training.main(_flags(tiny_model_dir, tmp, tmp / "out") + ["--memories", str(f["first"])]) == 0
    return _state(tmp / "out")


# ------------------------------------------------------------------ incremental cycles
@pytest.mark.parametrize("scope", ["all", "recall"])
def test_incremental_cycle_trains_new_plus_replay_and_forget_forces_a_full_retrain(tiny_model_dir, tmp_path, capsys,
                                                                                   scope):
    f = _files(tmp_path)
    out = tmp_path / "out"
    # "all": the cycle continues the merged weights; "recall": the activated adapter beside the base.
    # --incremental always: with auto, these five memories would be retrained in full (no dearer)
    flags = _flags(tiny_model_dir, tmp_path, out) + ["--adapter_scope", scope, "--incremental", "always"]
    assert run_training.main(flags + ["--memories", str(f["first"])]) == 0
    assert "cycle: full (no published version yet); 3 memories trained" in capsys.readouterr().out
    first = resolve_current(out / "models")

    assert run_training.main(flags + ["--memories", str(f["second"])]) == 0
    text = capsys.readouterr().out
    assert "cycle: incremental (2 new memories); 5 memories trained (2 new, 3 replayed)" in text
    second = resolve_current(out / "models")
    manifest = json.loads((second / MANIFEST).read_text())
    assert second != first and manifest["mode"] == "incremental" and manifest["base_version"] == str(first)
    if scope == "recall":  # the cycle continued the first version's adapter: trained further, not afresh
        from safetensors.torch import load_file

        a, b = (load_file(str(v / "memory_adapter" / "adapter_model.safetensors")) for v in (first, second))
        assert a.keys() == b.keys()
        lora_b = [k for k in a if "lora_B" in k]
        both = torch.cat([a[k].flatten() for k in lora_b]), torch.cat([b[k].flatten() for k in lora_b])
        assert not torch.equal(*both) and torch.cosine_similarity(*both, dim=0) > 0.5
    assert _state(out)["snapshot"] == sorted(FIRST + SECOND)

    assert run_training.main(flags) == 0  # nothing new: no training, no new version
    assert "cycle:" not in capsys.readouterr().out and resolve_current(out / "models") == second

    from memory.__main__ import main as memory_cli

    with MemoryVectorDB(out / "memory_db") as db:
        max_id = next(r.id for r in db.records() if "Max" in r.text)
    assert memory_cli(["--output_dir", str(out), "forget", str(max_id), "--yes"]) == 0
    for version in (first, second):  # gone from what recall reads, at once
        with MemoryVectorDB(version / "memory_db") as db:
            assert db.get(max_id).status == "deleted" and db.get(max_id).text == ""
    assert run_training.main(flags) == 0
    assert "cycle: full (1 memories of the current version were forgotten); 4 memories trained" in \
        capsys.readouterr().out
    state = _state(out)
    assert state["mode"] == "full" and "The user has a dog named Max." not in state["snapshot"]


def test_replay_is_capped_so_a_cycle_costs_new_plus_replay(tiny_model_dir, tmp_path, capsys):
    f = _files(tmp_path)
    out = tmp_path / "out"
    flags = _flags(tiny_model_dir, tmp_path, out) + ["--replay_cap", "1", "--adapter_scope", "all"]
    assert run_training.main(flags + ["--memories", str(f["first"])]) == 0
    assert run_training.main(flags + ["--memories", str(f["second"])]) == 0
    assert "3 memories trained (2 new, 1 replayed)" in capsys.readouterr().out  # --incremental auto: cheaper


def _plan(flags, memories=None):
    from memory.config import parse_args
    from memory.training_service import MemoryTrainingService

    service = MemoryTrainingService(*parse_args(flags))
    try:
        if memories:
            service.import_memories(str(memories))
        return service.plan_cycle([], "all")
    finally:
        service.close()


def test_auto_plans_a_full_retrain_where_it_costs_no_more_or_the_adapter_is_activated(tiny_model_dir, tmp_path):
    f = _files(tmp_path)
    out = tmp_path / "out"
    flags = _flags(tiny_model_dir, tmp_path, out) + ["--adapter_scope", "all"]
    assert run_training.main(flags + ["--memories", str(f["first"])]) == 0
    new = tmp_path / "third.jsonl"
    new.write_text(json.dumps({"text": "The user plays the cello.", "user_id": "alex"}) + "\n")
    # step 2 (1 epoch, batch 8, mix 2:1:2, no floor): 5 samples per memory; 4 live memories: 3 steps
    plan = _plan(flags + ["--replay_cap", "1"], new)
    assert plan["mode"] == "incremental" and len(plan["memory_ids"]) == 2  # 1 new + 1 replayed: 2 steps
    plan = _plan(flags + ["--replay_ratio", "3"])  # 1 new + 3 replayed: every memory, 3 steps
    assert plan["mode"] == "full" and "costs no more (3 step-2 steps for 4 memories; an incremental cycle 3)" \
        in plan["reason"]
    plan = _plan(flags + ["--replay_cap", "1", "--decode_min_steps", "60"])  # the step floor binds both ways
    assert plan["mode"] == "full" and "costs no more (60 step-2 steps" in plan["reason"]
    assert _plan(flags + ["--replay_ratio", "3", "--incremental", "always"])["mode"] == "incremental"


# ------------------------------------------------------------------ crashes and resume
@pytest.mark.reliability(fault='SIGKILL at each of 4 stage boundaries, real process',
                         outcome='rerun equals an uninterrupted run; one version')
def test_kill_9_at_every_stage_boundary_then_rerun_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, reference):
    f = _files(tmp_path)
    out = tmp_path / "out"
    cmd = ["run_training.py", *_flags(tiny_model_dir, tmp_path, out), "--memories", str(f["first"])]
    for point in ("planned", "recall-trained", "decoded", "published"):
        done = _run_cli(cmd, env={"RECALL_MEMORY_CRASH_AT": point})
        assert done.returncode == -signal.SIGKILL, done.stdout[-2000:]
        if point == "published":  # switched, but the live DB was not yet updated
            with MemoryVectorDB(out / "memory_db") as db:
                assert db.count(statuses=("pending",)) == 3
    done = _run_cli(cmd)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "already published" in done.stdout and "resumed unfinished run" in done.stdout
    assert _state(out) == reference
    assert len(list((out / "models").glob("model_*"))) == 1  # the crash after the switch did not publish twice


@pytest.mark.reliability(fault='kill -9 in the middle of step 3.1 and of step 3.2', outcome='resumed from the last complete checkpoint')
def test_kill_9_mid_training_resumes_from_the_trainer_checkpoint(tiny_model_dir, tmp_path, reference):
    f = _files(tmp_path)
    out = tmp_path / "out"
    cmd = ["run_training.py", *_flags(tiny_model_dir, tmp_path, out, epochs=40), "--memories", str(f["first"])]
    for stage in ("recall", "decode"):
        proc = _cli(cmd)
        _wait(lambda: list(out.glob(f"runs/*/{stage}/checkpoint-*/checkpoint_complete.json")),
              what=f"a complete {stage} checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert not (out / "models").exists() or not list((out / "models").glob("model_*"))
    done = _run_cli(cmd)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "step 3.2: resuming from" in done.stdout
    state = _state(out)
    assert state == {**reference, "mode": "full"}


@pytest.mark.reliability(fault='A checkpoint cut short by a kill', outcome='removed, never resumed from')
def test_a_checkpoint_cut_short_by_a_kill_is_never_resumed_from(tmp_path):
    from memory.runs import CHECKPOINT_COMPLETE, last_complete_checkpoint

    for step, complete in ((2, True), (4, True), (6, False)):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text('{"global_st')  # what a kill mid-write leaves
        if complete:
            (ckpt / CHECKPOINT_COMPLETE).write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-6").exists()  # removed, so rotation never keeps it
    assert last_complete_checkpoint(tmp_path / "missing") is None


@pytest.mark.reliability(fault='SIGTERM during training (systemd stop)',
                         outcome='exit 0 with a checkpoint; next run resumes', cls="bounded")
def test_sigterm_stops_at_a_step_end_with_a_checkpoint_and_the_next_run_resumes(tiny_model_dir, tmp_path):
    f = _files(tmp_path)
    out = tmp_path / "out"
    cmd = ["run_training.py", *_flags(tiny_model_dir, tmp_path, out, epochs=40), "--memories", str(f["first"])]
    proc = _cli(cmd)
    _wait(lambda: _status(out).get("stage") == "decode" and _status(out).get("progress"), what="step 3.2 training")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, text[-3000:]
    assert time.monotonic() - sent < 30  # well inside the unit's TimeoutStopSec
    assert "run the same command again to resume" in text
    assert list(out.glob("runs/*/decode/checkpoint-*")) and not (out / "models").exists()
    assert _status(out)["last_run"]["result"] == "stopped"
    done = _run_cli(cmd)
    assert done.returncode == 0 and "resumed unfinished run" in done.stdout and "step 3.2: resuming from" in done.stdout
    assert _state(out)["snapshot"] == sorted(FIRST)


@pytest.mark.reliability(fault='A chat session written while a cycle runs', outcome='nothing lost: trained in the next cycle', cls="daemon")
def test_a_session_written_during_a_cycle_waits_for_the_next_one(tiny_model_dir, tmp_path):
    from memory.chat_store import ChatStore
    from memory.schema import ChatMessage, ChatSession

    f = _files(tmp_path)
    out, chats = tmp_path / "out", tmp_path / "chats"
    chats.mkdir()
    flags = _flags(tiny_model_dir, tmp_path, out, epochs=20, chats=str(chats))
    proc = _cli(["run_training.py", *flags, "--memories", str(f["first"])])
    _wait(lambda: _status(out).get("stage") == "recall", what="step 3.1")
    session = ChatSession("late-1", "alex", "2026-11-26T10:00:00+00:00",
                          [ChatMessage("user", "I just moved to Lisbon."), ChatMessage("assistant", "Nice!")])
    ChatStore(str(chats)).save_session(session)
    text, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, text[-3000:]
    with MemoryVectorDB(out / "memory_db") as db:
        assert db.session_state("late-1") is None  # not read, not half-read by the running cycle
    done = _run_cli(["run_training.py", *flags, "--stage", "extract"])
    assert done.returncode == 0 and "1 extracted" in done.stdout
    with MemoryVectorDB(out / "memory_db") as db:
        assert db.session_state("late-1") == session.content_hash()


# ------------------------------------------------------------------ the daemon
@pytest.mark.reliability(fault='Two daemons and a manual run at once',
                         outcome="one trains; the others exit 3 with the holder's pid", cls="daemon")
def test_two_daemons_one_trains_and_a_manual_run_is_refused(tiny_model_dir, tmp_path):
    f = _files(tmp_path)
    out = tmp_path / "out"
    flags = _flags(tiny_model_dir, tmp_path, out, epochs=150)
    assert _run_cli(["run_training.py", *flags, "--memories", str(f["first"]), "--stage", "extract"]).returncode == 0
    daemon = _cli(["run_training.py", "--daemon", *flags, "--schedule_every", "1d"])
    _wait(lambda: _status(out).get("state") == "training" and _status(out).get("progress"), what="the daemon training")
    # a second daemon, a manual run and --status, all while the first daemon trains
    procs = [_cli(["run_training.py", "--daemon", *flags]), _cli(["run_training.py", *flags]),
             _cli(["run_training.py", "--status", "--output_dir", str(out)])]
    second, manual, status = [subprocess.CompletedProcess(p.args, p.wait(timeout=120), p.stdout.read()) for p in procs]
    assert daemon.poll() is None and _status(out).get("state") == "training"
    assert second.returncode == 3 and f"already running (pid {daemon.pid}" in second.stdout
    assert manual.returncode == 3 and f"training already running (pid {daemon.pid}" in manual.stdout
    assert status.returncode == 0 and f"daemon: running (pid {daemon.pid})" in status.stdout
    assert f"state: training (pid {daemon.pid})" in status.stdout
    daemon.send_signal(signal.SIGTERM)  # what `systemctl stop` sends
    text, _ = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, text[-3000:]
    assert "daemon stopped" in text and not (out / "models").exists()
    # the next start resumes the stopped cycle (shortened: 1 epoch, the checkpoint is past it) and publishes
    daemon = _cli(["run_training.py", "--daemon", *_flags(tiny_model_dir, tmp_path, out), "--schedule_every", "1d"])
    _wait(lambda: (_status(out).get("last_run") or {}).get("result") == "ok", timeout=180, what="a published cycle")
    daemon.send_signal(signal.SIGTERM)
    text, _ = daemon.communicate(timeout=60)
    assert daemon.returncode == 0 and "resuming unfinished run" in text
    assert _state(out)["snapshot"] == sorted(FIRST)
    status = _run_cli(["run_training.py", "--status", "--output_dir", str(out)])
    assert "daemon: not running" in status.stdout and "last run: ok (startup)" in status.stdout


@pytest.mark.reliability(fault='A cycle failing on a corrupt SFT file under the daemon',
                         outcome='daemon alive; current kept; recovered when fixed', cls="daemon")
def test_the_daemon_survives_a_failed_cycle_and_keeps_current(tiny_model_dir, tmp_path):
    f = _files(tmp_path)
    out = tmp_path / "out"
    flags = _flags(tiny_model_dir, tmp_path, out)
    assert run_training.main(flags + ["--memories", str(f["first"])]) == 0
    before = resolve_current(out / "models")
    assert run_training.main(flags + ["--memories", str(f["second"]), "--stage", "extract"]) == 0
    f["sft"].write_text('{"prompt": "broken"}\n')  # step 2 fails: SFT line without an answer
    daemon = _cli(["run_training.py", "--daemon", *flags, "--schedule_every", "0.05m",
                   "--trigger_min_memories", "0", "--trigger_min_sessions", "0"])
    _wait(lambda: (_status(out).get("last_run") or {}).get("result") == "failed", what="a failed cycle")
    assert daemon.poll() is None and resolve_current(out / "models") == before
    _files(tmp_path)  # the SFT file is fixed; the next periodic check resumes the run
    _wait(lambda: (_status(out).get("last_run") or {}).get("result") == "ok", timeout=180, what="a recovered cycle")
    daemon.send_signal(signal.SIGTERM)
    text, _ = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, text[-3000:]
    assert "cycle failed" in text and "sft.jsonl:1" in text
    assert resolve_current(out / "models") != before and _state(out)["snapshot"] == sorted(FIRST + SECOND)


def test_threshold_trigger_and_periodic_check(tiny_model_dir, tmp_path, monkeypatch):
    from memory.config import parse_args
    from memory.training_scheduler import TrainingScheduler

    f = _files(tmp_path)
    out = tmp_path / "out"
    flags = _flags(tiny_model_dir, tmp_path, out)
    assert run_training.main(flags + ["--memories", str(f["first"]), "--stage", "extract"]) == 0
    scheduler = TrainingScheduler(*parse_args(flags + ["--trigger_min_memories", "5"]))
    cycles = []
    monkeypatch.setattr(scheduler, "run_cycle", lambda trigger: cycles.append(trigger) or True)
    assert scheduler.check("threshold") is None  # 3 waiting < 5
    assert scheduler.check("periodic") is True and cycles == ["periodic"]  # anything waiting
    scheduler.args.trigger_min_memories = 3
    assert scheduler.check("threshold") is True and cycles[-1] == "threshold"
    assert _status(out)["waiting"]["memories"] == 3


def test_bad_schedule_options_are_rejected(capsys):
    assert run_training.main(["--daemon", "--schedule_every", "weekly"]) == 2
    assert "schedule_every" in capsys.readouterr().err
    assert run_training.main(["--daemon", "--schedule_at", "25:00"]) == 2


def test_status_on_an_empty_directory(tmp_path, capsys):
    assert run_training.main(["--status", "--output_dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "daemon: not running" in text and "state: idle" in text and "last run: none recorded" in text


# ------------------------------------------------------------------ the memory CLI
def test_memory_cli_list_show_add_export(tiny_model_dir, tmp_path, capsys):
    from memory.__main__ import main as memory_cli

    f = _files(tmp_path)
    out = tmp_path / "out"
    flags = _flags(tiny_model_dir, tmp_path, out)
    assert run_training.main(flags + ["--memories", str(f["first"]), "--stage", "extract"]) == 0
    capsys.readouterr()
    assert memory_cli(["--output_dir", str(out), "list", "--user", "alex"]) == 0
    assert capsys.readouterr().out.count("pending") == 3
    assert memory_cli(["--output_dir", str(out), "add", "The user likes tea.", "--user", "alex",
                       "--model_name_or_path", str(tiny_model_dir), "--precision", "fp32"]) == 0
    assert "added memory 4 for alex" in capsys.readouterr().out
    assert memory_cli(["--output_dir", str(out), "search", "tea", "-k", "2",
                       "--model_name_or_path", str(tiny_model_dir), "--precision", "fp32"]) == 0
    hits = [line for line in capsys.readouterr().out.splitlines() if " pending " in line]
    assert len(hits) == 2 and all(float(line.split()[0]) <= 1.0 for line in hits)
    assert memory_cli(["--output_dir", str(out), "show", "4"]) == 0
    assert "source:      manual" in capsys.readouterr().out
    dump = tmp_path / "export.jsonl"
    assert memory_cli(["--output_dir", str(out), "export", "--status", "pending", "--out", str(dump)]) == 0
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert sorted(r["text"] for r in rows) == sorted(FIRST + ["The user likes tea."])
    assert all({"session_id", "message_index", "said_at", "status", "source"} <= set(r) for r in rows)
    capsys.readouterr()
    assert memory_cli(["--output_dir", str(out), "export", "--out", str(dump)]) == 0  # active only: none yet
    assert dump.read_text() == "" and "left out by --status (active): 4 pending" in capsys.readouterr().err
    assert memory_cli(["--output_dir", str(out), "add", "The user's \x1b[31mred\x1b[0m\nfake line", "--user", "alex",
                       "--model_name_or_path", str(tiny_model_dir), "--precision", "fp32"]) == 0
    capsys.readouterr()
    assert memory_cli(["--output_dir", str(out), "list", "--user", "alex"]) == 0
    listed = capsys.readouterr().out
    assert "\x1b" not in listed and "\\x1b[31mred" in listed
    assert memory_cli(["--output_dir", str(out), "show", "99"]) == 1
    assert "no memory record with id 99" in capsys.readouterr().err
    assert memory_cli(["--output_dir", str(tmp_path / "nowhere"), "list"]) == 1
