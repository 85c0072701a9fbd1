"""Bad numbers and paths are refused in one line before anything runs (memory.config,
recall.arg_checks, run_training._path_problem)."""
import pytest

import run_training
from memory.config import parse_args


@pytest.mark.parametrize("flag,value", [
    ("--learning_rate", "-1"), ("--learning_rate", "nan"), ("--per_device_train_batch_size", "0"),
    ("--num_train_epochs", "nan"), ("--num_train_epochs", "-2"), ("--decode_batch_size", "0"),
    ("--decode_learning_rate", "0"), ("--k_folds", "1"), ("--k_folds", "-3"), ("--trigger_min_sessions", "-1"),
    ("--near_duplicate_cosine", "0"), ("--near_duplicate_cosine", "nan"), ("--extraction_batch_size", "0"),
    ("--eval_unseen_fraction", "1.5"), ("--keep_versions", "0"), ("--replay_ratio", "inf"),
])
@pytest.mark.reliability(fault="Negative, zero, NaN or infinite numeric options", outcome="refused in one line naming the option, rc 2")
def test_a_bad_number_is_refused_naming_the_option(flag, value, capsys):
    with pytest.raises(ValueError, match=flag.lstrip("-")):
        parse_args([flag, value])
    assert run_training.main([flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flag.lstrip("-") in err[0]


def test_the_defaults_pass():
    parse_args([])
    parse_args(["--trigger_min_sessions", "0", "--k_folds", "0", "--near_duplicate_cosine", "1.01"])


@pytest.mark.reliability(fault="A misspelt --chats_dir, or a file given as a directory", outcome="one-line error, rc 2, nothing created")
def test_a_missing_or_wrong_directory_is_an_error_and_never_created(tmp_path, capsys):
    missing = tmp_path / "chats_typo"
    assert run_training.main(["--chats_dir", str(missing), "--output_dir", str(tmp_path / "out")]) == 2
    assert not missing.exists() and "no such directory" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert run_training.main(["--chats_dir", str(tmp_path / "file"), "--output_dir", str(tmp_path / "out")]) == 2
    assert "--chats_dir" in capsys.readouterr().err
    assert run_training.main(["--chats_dir", "", "--output_dir", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "--output_dir" in err and "not a directory" in err


@pytest.mark.parametrize("flag,value,words", [("--precision", "fp8", "precision"), ("--device", "gpu", "device"),
                                               ("--device", "cuda:x", "device")])
def test_a_bad_choice_is_refused_in_one_line(flag, value, words, capsys):
    assert run_training.main([flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "Traceback" not in err[0]


def test_cuda_asked_where_there_is_none_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert run_training.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device here" in err[0]


@pytest.mark.reliability(fault="The memory CLI writing while a run holds the DB", outcome="one-line error naming the DB, rc 1")
def test_the_memory_cli_meeting_a_locked_database_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    import sqlite3

    from memory.__main__ import main as memory_cli
    from memory.vector_db import MemoryVectorDB

    import numpy as np

    from memory.schema import MemoryCandidate

    out = tmp_path / "out"
    with MemoryVectorDB(out / "memory_db") as db:
        [rid] = db.add([MemoryCandidate("The user likes tea.", "alex")], np.ones((1, 4), np.float32), "test")
    db_file = next((out / "memory_db").glob("*.sqlite*"))
    holder = sqlite3.connect(db_file)
    holder.execute("BEGIN EXCLUSIVE")  # a training run writing the store
    monkeypatch.setattr("memory.vector_db.BUSY_TIMEOUT_S", 0.5)  # it waits 60 s for the run by default
    try:
        code = memory_cli(["--output_dir", str(out), "forget", str(rid), "--yes"])
    finally:
        holder.rollback()
        holder.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "locked" in err[0] and "Traceback" not in err[0]
