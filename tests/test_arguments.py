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
def test_a_bad_number_is_refused_naming_the_option(flag, value, capsys):
    with pytest.raises(ValueError, match=flag.lstrip("-")):
        parse_args([flag, value])
    assert run_training.main([flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flag.lstrip("-") in err[0]


def test_the_defaults_pass():
    parse_args([])
    parse_args(["--trigger_min_sessions", "0", "--k_folds", "0", "--near_duplicate_cosine", "1.01"])


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
