"""bench/report.py renders docs/BENCHMARKS.md from result files: tables, targets, plots."""
import json

import pytest

pytest.importorskip("matplotlib")


def _retrieval(sample_id, trained_ranks, minilm_ranks):
    def block(ranks):
        rows = [{"question": f"q{i}", "rank": r} for i, r in enumerate(ranks)]
        return {"recall_at_5": sum(0 < r <= 5 for r in ranks) / len(ranks), "per_question": rows,
                "by_category_recall_at_5": {"single-hop": {"n": len(ranks), "mean": 0.5}}}
    return {"sample_id": sample_id, "memories": 10, "questions": len(trained_ranks), "date": "2026-11-26",
            "trained_recall": block(trained_ranks), "untrained_last_token": block([0] * len(trained_ranks)),
            "minilm_rag": block(minilm_ranks), "bm25": block(minilm_ranks),
            "seconds": {"train": 10, "evaluate": 1}, "wall_seconds": 11, "stage_seconds": {"recall": 9}}


def test_report_states_targets_and_writes_plots(tmp_path):
    from bench.report import render

    results = tmp_path / "results"
    (results / "locomo" / "full_agreement").mkdir(parents=True)
    (results / "locomo" / "full_agreement" / "retrieval-c1.json").write_text(json.dumps(_retrieval("c1", [1, 2, 7, 0], [1, 1, 1, 9])))
    speed_rows = [
        {"name": "step 2 naive", "step": "decode", "tokens_per_second": 100, "tflops_per_second": 0.05, "mfu": 0.33,
         "mfu_vs_bf16_peak": 50, "vs_naive": 1.0, "padding_fraction": 0.3, "precision": "fp32"},
        {"name": "step 2 default", "step": "decode", "tokens_per_second": 170, "tflops_per_second": 0.08, "mfu": 0.56,
         "mfu_vs_bf16_peak": 80, "vs_naive": 1.7, "padding_fraction": 0.2, "precision": "fp32"},
    ]
    (results / "speed.json").write_text(json.dumps({"date": "2026-11-26", "machine": "cpu", "command": "python -m bench.speed",
                                                    "peak_tflops": {"fp32": 0.15, "bf16": 0.001}, "rows": speed_rows}))
    (results / "recall_latency.json").write_text(json.dumps({
        "date": "2026-11-26", "questions": 3, "tokens": 8, "memories": 5, "command": "python -m bench.recall_latency",
        "tokens_per_second": {"hf_generate": 15.0, "loop_recall": 13.0}, "plain_step_ms": 60.0,
        "recall_latency_ms": 90.0, "query_and_search_ms": 2.0, "recall_latency_vs_plain_step": 1.5}))
    gpu = [{"step": "decode", "device": "NVIDIA H100 80GB HBM3", "deepspeed": None, "batch_per_device": 64,
            "compile_layers": c, "length_grouping": False, "timed_steps": 50, "tokens_per_second": t,
            "tflops_per_second": t / 250, "mfu": m, "mfu_6n": m * 1.5, "peak_memory_gib": 20.0,
            "nominal_bf16_tflops": 989.4} for c, t, m in ((False, 23793, 0.098), (True, 50103, 0.207))]
    (results / "gpu_levers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gpu))
    docs = tmp_path / "docs" / "BENCHMARKS.md"
    render(results, docs, {"locomo": {"command": "python -m bench.locomo", "date": "2026-11-26 10:00", "seconds": 5}})
    text = docs.read_text()
    # pooled recall@5: trained 2/4 = 0.5 vs MiniLM 3/4 = 0.75 -> missed; 1.7x < 3x -> missed; 1.5x > 1.2x -> missed
    assert "0.500 vs 0.750, **missed**" in text
    assert "best 1.70×, **missed**" in text
    assert "= **1.50×**" in text and "Target (recall ≤ 1.2× a plain step): **missed**" in text
    assert "step 2 reaches **0.56** (step 2 default), **met**" in text  # against the fp32 peak: bf16 is slower here
    assert "`python -m bench.locomo --conversations 5,6,7,8,9 --parts retrieval" in text
    assert "(no scale results yet)" in text
    assert "| decode | earlier | plain | 64 | yes | 1 | 0 | 50,103 |" in text
    assert "best 0.207 of useful FLOPs (NVIDIA H100 80GB HBM3), **missed**; by the 6N count 0.31" in text
    # a faster row on another card, whose training diverged: the target line names the card, the
    # best H100 figure, and that the figure is throughput only
    h200 = dict(gpu[1], device="NVIDIA H200", mfu=0.424, packing=True, train_loss=float("nan"),
                variant="packed", invocation=1, code="this")
    (results / "gpu_levers6.jsonl").write_text(json.dumps(h200) + "\n")
    render(results, docs, {})
    text = docs.read_text()
    assert "best 0.424 of useful FLOPs (NVIDIA H200), **met**" in text and "Best on an H100: 0.207." in text
    assert "That run's training loss became NaN" in text and "| plain, packed | 64 |" in text
    for png in ("benchmarks_locomo_retrieval_full_agreement.png", "benchmarks_speed.png"):
        assert (docs.parent / png).stat().st_size > 1000 and f"]({png})" in text


def test_precision_seeds_summarises_each_precision_over_its_own_runs():
    from bench.precision_seeds import summary

    rows = [{"precision": "bf16", "trained_recall_at_1": 0.7, "train_seconds": 10.0},
            {"precision": "fp32", "trained_recall_at_1": 0.9, "train_seconds": 20.0},
            {"precision": "bf16", "trained_recall_at_1": 0.8, "train_seconds": 12.0}]
    bf16 = summary(rows, "bf16")
    assert bf16["runs"] == 2 and bf16["trained_recall_at_1"]["values"] == [0.7, 0.8]
    assert abs(bf16["trained_recall_at_1"]["mean"] - 0.75) < 1e-9 and abs(bf16["trained_recall_at_1"]["std"] - 0.05) < 1e-9
    assert summary(rows, "fp32")["train_seconds"]["mean"] == 20.0 and "kfold_recall_at_1" not in bf16


def test_the_answer_section_puts_chat_next_to_the_peer_for_each_data_set(tmp_path):
    from bench.report import render

    def rates(hit, **extra):
        return {"final_hit_rate": hit, "n": 10, "context_tokens": 40.0, "seconds_per_answer": 0.5, **extra}

    evaluation = {"chat": rates(0.8, asked_rate=0.9, invented_recall_rate=0.0),
                  "rag_peer": {"final_hit_rate": 0.6, "n": 10, "by_k": {"1": rates(0.6), "2": rates(0.5), "3": rates(0.4)}},
                  "no_memory": rates(0.1), "general": {"false_recall_rate": 0.05, "n": 40},
                  "trained_recall": {"recall_at_1": 0.7}, "minilm_rag": {"recall_at_1": 0.65},
                  "fused_recall_minilm": {"recall_at_1": 0.75}, "decoding": {"n": 12, "decode_exact_match": 1.0}}
    results = tmp_path / "results"
    results.mkdir()
    (results / "memory_decoding_test_set.json").write_text(json.dumps(
        {"date": "2026-12-05", "machine": "cpu", "pipeline": {"seconds": 300}, "evaluation": evaluation}))
    docs = tmp_path / "docs" / "BENCHMARKS.md"
    render(results, docs, {})
    text = docs.read_text()
    assert "### test: `examples/test/`" in text and "### development" not in text  # only what was measured
    assert "| `chat.py` defaults | **0.800** | 0.900 | 0.000 | 40 | 0.50 |" in text
    assert "| RAG peer, MiniLM top 3 in the prompt | 0.400 |" in text and "false recall rate **0.050**" in text
    assert (docs.parent / "benchmarks_answers.png").stat().st_size > 1000


def test_the_extraction_section_shows_each_set_method_and_locomo(tmp_path):
    from bench.report import extraction_section

    row = {"set": "dev", "method": "rewrite", "facts_found": 0.9, "precision": 0.8, "junk": 2, "update_precision": None,
           "update_recall": 0.5, "rule_alone_precision": 1.0, "rule_alone_recall": 0.75, "seconds_per_session": 0.01,
           "by_kind": {"plain": {"recall": 0.9, "n": 10}}}
    loc = {"set": "locomo", "method": "rewrite", "conversations": ["conv-26"], "gold_facts": 40, "coverage": 0.25,
           "coverage_loose": 0.4, "extracted": 30, "unsupported_rate": 0.1, "seconds_per_session": 0.02,
           "matches_at_threshold": [{"cosine": 0.701, "gold": "A likes tea.", "extracted": "A drinks tea daily."}]}
    (tmp_path / "extraction_quality.json").write_text(json.dumps({"date": "2026-12-05", "rows": [row], "locomo": [loc],
                                                                  "command": "python -m bench.extraction_quality --sets dev"}))
    text = "\n".join(extraction_section(tmp_path))
    assert "| dev | rewrite | 0.90 | 0.80 | 2 | – | 0.50 | 1.00 | 0.75 | 0.01 |" in text
    assert "| conv-26 | rewrite | 40 | 0.250 | 0.400 | 30 | 0.100 | 0.02 |" in text
    assert '0.701: gold "A likes tea." / extracted "A drinks tea daily."' in text
    assert "Command: `python -m bench.extraction_quality --sets dev`." in text  # the command that ran
    assert "extraction_quality_test.json" not in text  # absent files are not rendered
