"""Every command-line entry point prints its help: argparse formats each help string with
``%``, so a bare percent sign in one option's help (``"only 5% of"``) crashed ``--help``."""
import contextlib
import io

import pytest

import chat
import evaluate
import run_training
from bench.precision_seeds import main as precision_seeds_main
from bench.recall_step1 import main as recall_step1_main
from memory.__main__ import main as memory_main


@pytest.mark.parametrize("main, expected", [
    (run_training.main, ["--recall_threshold", "--decode_length_grouped", "at most 1% of", "--daemon", "--status"]),
    (evaluate.main, ["--output_dir", "--questions", "--general_prompts"]),
    (chat.main, ["--output_dir", "--model_dir", "--ask", "--recall", "--retrieval", "--force_recall"]),
    (memory_main, ["show"]),
    (precision_seeds_main, ["--seeds", "--k_folds"]),
    (recall_step1_main, ["--sources", "--model_name_or_path", "--set FIELD=VALUE"]),
], ids=["run_training", "evaluate", "chat", "python -m memory", "python -m bench.precision_seeds",
        "python -m bench.recall_step1"])
def test_help_prints_every_option(main, expected):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = " ".join(out.getvalue().split())  # argparse wraps lines
    for word in expected:
        assert word in text, word


def test_step2_arguments_print_their_help():
    from transformers import HfArgumentParser

    from recall.text_memory_train import MemoryDecodingArguments

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        HfArgumentParser(MemoryDecodingArguments).parse_args_into_dataclasses(["--help"])
    assert stop.value.code == 0
    assert "about 20% faster" in " ".join(out.getvalue().split())


def test_recall_bench_set_takes_typed_training_fields_and_refuses_unknown_ones():
    from bench.recall_step1 import training_overrides

    assert training_overrides(["distill_weight=3", "lora_r=32", "learn_temperature=false"]) == {
        "distill_weight": 3.0, "lora_r": 32, "learn_temperature": False}
    for bad in (["no_such_field=1"], ["lora_r"], ["lora_r=abc"], ["abstention=maybe"]):
        with pytest.raises(SystemExit):
            training_overrides(bad)


@pytest.mark.parametrize("content", ['{"prompts": ["hi"]}', '["fine", ""]', "not json"])
def test_evaluate_names_a_bad_general_prompts_file(tmp_path, capsys, content):
    bad = tmp_path / "general.json"
    bad.write_text(content)
    questions = tmp_path / "q.json"
    questions.write_text('[{"question": "Where do I live?", "expected": "porto"}]')
    rc = evaluate.main(["--output_dir", str(tmp_path / "none"), "--questions", str(questions),
                        "--general_prompts", str(bad)])
    err = capsys.readouterr().err
    assert rc == 1 and str(bad) in err
