"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer.

The tokenizer comes from the default model's converted checkpoint
(``recall.model_loading.materialize``); converting the packaged GGUF happens once per
machine and is cached under ``$RECALL_MEMORY_CACHE`` (default ``~/.cache/recall_memory``).
"""
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from recall.model_loading import materialize, resolve_model_source

# The tiny model's matmuls are microseconds long: a second OpenMP thread only adds
# synchronisation (and stalls badly when the machine is busy).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_model_dir():
    return materialize(resolve_model_source())


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def make_tiny_model(tokenizer, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.bos_token_id)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return make_tiny_model(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """The tiny model saved as an ordinary HF checkpoint (loadable by path)."""
    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------ docs/RELIABILITY.md
# Tests marked @pytest.mark.reliability(fault=..., outcome=..., cls=...) are the faults and
# hostile inputs tried; with RELIABILITY_REPORT=PATH the run writes their tables there (see
# README): one row per class of failure (its guarantee, its tests, its benchmark figure), then
# one row per test. A marker without ``cls`` takes its file's class (_FILE_CLASS).
_RELIABILITY: dict = {}
_CLASSES = {  # class -> (name, guarantee)
    "forget": ("Forget lasts", "A forgotten memory is erased at once (text, cues, vector, its bytes in every index file "
               "and snapshot), never comes back from a later extraction or import unless the user adds it, and is "
               "never published: a forget during a cycle retires the run or erases it from the new version."),
    "secrets": ("Secrets in any phrasing", "No password, PIN, login or API key is stored as a memory or trained "
                "as SFT data; ordinary facts with numbers survive."),
    "crash": ("Exact reruns after a crash", "A kill -9 or power cut at any point, then the same command, ends "
              "where an uninterrupted run ends (same rows, statuses, superseded_by, one version); current "
              "always loads."),
    "bounded": ("Bounded work", "Work per message and session is capped (logged when it applies); SIGTERM stops "
                "within one unit or training step, and the rerun continues."),
    "errors": ("One-line errors", "A bad option, path, file or locked DB gets one line naming it and rc != 0; "
               "nothing is created, skipped in silence or lost."),
    "input": ("Hostile input", "Chat text never becomes a token, an instruction or another user's memory; "
              "random files are parsed or refused by name."),
    "daemon": ("Daemon and concurrency", "One cycle at a time; a session written during a cycle waits for "
               "the next; the daemon outlives a failed cycle and clock jumps."),
    "privacy": ("Private files", "Everything a run writes is its owner's alone (0600 files, 0700 directories)."),
    "zero": ("Several GPUs (ZeRO)", "ZeRO-2/3 over 2 processes with the defaults trains, resumes and publishes."),
}
_FILE_CLASS = {"test_arguments.py": "errors", "test_chat_store.py": "errors", "test_daemon.py": "crash",
               "test_deepspeed.py": "zero", "test_extraction.py": "bounded", "test_failures.py": "crash",
               "test_fuzz.py": "input", "test_hardening.py": "input", "test_ingest.py": "forget",
               "test_injection.py": "input", "test_publish.py": "crash", "test_updates.py": "input",
               "test_vector_db.py": "crash", "test_exact_rerun.py": "crash", "test_secrets.py": "secrets"}


def _bench_figure(cls: str) -> str:
    """The class's benchmark figure, read from bench/results (empty when there is none)."""
    import json
    from pathlib import Path

    results = Path(__file__).resolve().parent.parent / "bench" / "results"
    try:
        if cls == "secrets":
            r = json.loads((results / "secrets_filter.json").read_text())["templated (seed 0)"]
            lib, base = r["library"], r["regex"]
            return (f"`python -m bench.secrets_filter`: recall {lib['recall']:.3f}, precision {lib['precision']:.3f} "
                    f"on {lib['positives']} secrets / {lib['negatives']} look-alikes (regex baseline "
                    f"{base['recall']:.3f} / {base['precision']:.3f})")
        if cls == "crash":
            r = json.loads((results / "fault_injection.json").read_text())
            return (f"`python -m bench.fault_injection`: {r['runs']} runs ({r['killed']} killed mid-run), "
                    f"{r['differences']} differences ({r['sessions']} sessions, {r['reference_rows']} rows)")
        if cls == "input":
            r = json.loads((results / "fuzz_readers.json").read_text())
            return f"`python -m bench.fuzz_readers`: {sum(v['examples'] for v in r.values())} random files, all parsed or refused by name"
    except (OSError, KeyError, ValueError):
        return ""
    return ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    marker = item.get_closest_marker("reliability")
    if marker is None or (report.when != "call" and report.passed):
        return
    key = (item.path.name, item.originalname)
    row = _RELIABILITY.setdefault(key, {"fault": marker.kwargs.get("fault", item.originalname),
                                        "outcome": marker.kwargs.get("outcome", ""), "cases": 0, "passed": 0,
                                        "cls": marker.kwargs.get("cls", _FILE_CLASS.get(item.path.name, "input")),
                                        "test": f"{item.path.name}::{item.originalname}"})
    if report.when == "call" or report.failed:
        row["cases"] += 1
        row["passed"] += int(report.passed)


def _class_table(rows) -> list:
    lines = ["| class | guarantee | tests (pass / cases) | benchmark figure |", "|---|---|---|---|"]
    for cls, (name, guarantee) in _CLASSES.items():
        mine = [r for r in rows if r["cls"] == cls]
        if not mine:
            continue
        passed, cases = sum(r["passed"] for r in mine), sum(r["cases"] for r in mine)
        tests = "<br>".join(f"`{r['test']}`" for r in mine)
        lines.append(f"| {name} | {guarantee} | {passed} / {cases}<br>{tests} | {_bench_figure(cls) or '-'} |")
    return lines


def pytest_sessionfinish(session, exitstatus):
    import datetime
    import os
    import platform
    from pathlib import Path

    path = os.environ.get("RELIABILITY_REPORT")
    if not path or not _RELIABILITY:
        return
    rows = sorted(_RELIABILITY.values(), key=lambda r: r["test"])
    lines = ["# Reliability: guarantees, and the faults and hostile inputs tried", "",
             f"Generated by `RELIABILITY_REPORT={path} python -m pytest "
             f"{' '.join(session.config.invocation_params.args)}` on "
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} ({platform.machine()}, "
             f"{os.cpu_count()} cores). Each test row is a test marked `reliability`; *cases* counts its "
             "parametrised instances (the fuzz rows run a fixed-seed hypothesis budget each). Benchmark "
             "figures are read from `bench/results/`.", "", "## By class of failure", "", *_class_table(rows), "",
             "## Each fault tried", "",
             "| fault or hostile input | cases | outcome checked | result | test |", "|---|---|---|---|---|"]
    for r in rows:
        result = "pass" if r["passed"] == r["cases"] else f"**FAIL** ({r['cases'] - r['passed']} of {r['cases']})"
        cells = [str(r[k]).replace("<", "&lt;").replace("|", "\\|") for k in ("fault", "outcome")]
        lines.append(f"| {cells[0]} | {r['cases']} | {cells[1]} | {result} | `{r['test']}` |")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
