"""What bench.gpu_train counts as trained tokens: the FLOPs behind every MFU figure."""
import torch

from bench.gpu_train import CountingCollator

R = 7  # the <recall> id in these batches


def _batch(rows, pad=0):
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def test_an_activated_step_1_batch_trains_the_recall_token_alone():
    rows = [[1, 2, 3, R], [4, 5, R]]
    collate = CountingCollator(lambda _: _batch(rows), R, query=True)
    collate(None)
    assert collate.batches[-1]["tokens"] == 7 and collate.batches[-1]["tail_tokens"] == 2


def test_an_activated_step_2_batch_trains_from_recall_on_and_a_plain_batch_counts_no_tail():
    rows = [[1, 2, R, 9, 9, 9], [4, R, 9]]
    collate = CountingCollator(lambda _: _batch(rows), R)
    collate(None)
    assert collate.batches[-1]["tail_tokens"] == 4 + 2
    plain = CountingCollator(lambda _: _batch(rows))
    plain(None)
    assert "tail_tokens" not in plain.batches[-1]


def test_counts_made_in_a_worker_travel_in_the_batch_and_match_in_process_counts():
    """With data-loader workers the record rides in the batch; the training step takes it out
    before the model sees the batch, and the collected records equal in-process ones."""
    rows = [[1, 2, R, 9, 9, 9], [4, R, 9]]
    here, there = CountingCollator(lambda _: _batch(rows), R), CountingCollator(lambda _: _batch(rows), R, attach=True)
    here(None)
    batch = there(None)
    assert there.batches == [] and CountingCollator.COUNTS_KEY in batch

    class Trainer:
        def training_step(self, model, inputs):
            assert CountingCollator.COUNTS_KEY not in inputs
            return 0

    trainer = Trainer()
    there.count_steps(trainer)
    trainer.training_step(None, batch)
    there.collect()
    assert there.batches == here.batches
    plain, trainer = CountingCollator(lambda _: _batch(rows), attach=True), Trainer()
    plain.count_steps(trainer)
    trainer.training_step(None, plain(None))
    plain.collect()
    assert "tail_tokens" not in plain.batches[-1]


def test_a_packed_batch_counts_attention_per_sample_and_no_padding():
    """A packed step-2 batch is one row: its attention work is the sum of its samples' squared
    lengths (each attends within itself), not the row's length squared; the same samples padded
    count the same tokens and attention, plus their padding."""
    from recall.text_memory_train import DecodingCollator

    samples = [{"input_ids": ids, "labels": ids, "memory_row": -1, "recall_target": -1}
               for ids in ([1, 2, 3, 4, 5], [6, 7], [8, 9, 10])]
    counts = {}
    for packed in (False, True):
        collate = CountingCollator(DecodingCollator(0, torch.zeros(1, 4), 99, recall_id=R, packed=packed))
        collate(samples)
        counts[packed] = collate.batches[-1]
    assert counts[True] == {"tokens": 10, "padded": 10, "labelled": 7, "sq": 25 + 4 + 9}
    assert counts[False]["sq"] == counts[True]["sq"] and counts[False]["padded"] == 15
    assert counts[False]["labelled"] == 10  # padded rows keep each first label; it is never a target there


def test_the_benchmarks_random_model_has_no_zero_embedding_row(tokenizer):
    """A zero input row (HF zeroes the embedding's padding_idx row) at position 0 of a
    left-truncated sample stays zero through every layer, and each RMSNorm's backward at zero
    scales the gradient by 1/sqrt(eps): with 16 layers the 1B benchmark's gradients overflowed.
    The pad (<|im_end|>) must get an ordinary random row."""
    from bench.gpu_train import random_model

    lm = random_model("tiny", tokenizer, torch.float32, "cpu")
    rows = lm.get_input_embeddings().weight
    assert (rows.abs().sum(-1) > 0).all()
    assert rows[tokenizer.pad_token_id].abs().sum() > 0


def test_every_speed_row_runs_through_gpu_train(tmp_path):
    """``bench.speed`` drives ``bench.gpu_train.run`` with its own option set; an option
    ``gpu_train`` gained later (``sync_census``) once crashed its first row. Every row's options,
    on the tiny shape for one step, run and report a throughput."""
    from bench.gpu_train import run
    from bench.speed import SLOW_BF16, VARIANTS, _opts

    for name, step, kw in VARIANTS:
        kw = {**kw, **(SLOW_BF16 if kw.get("precision") == "bf16" else {}), "steps": 1, "warmup": 1,
              "batch": 2, "memories": 4}
        out = run(_opts(step=step, size="tiny", work=str(tmp_path / "w"), **kw))
        assert out["tokens_per_second"] > 0, name


def test_flops_count_the_context_tokens_that_ran_and_no_cached_ones(tmp_path):
    """With the activated adapter the context runs forward only, and with the context cache it
    runs once per distinct context: MFU counts the context tokens the timed steps really ran
    (a row once counted every context while the cache served most of them, and read MFU 1.15)."""
    from bench.gpu_train import run
    from bench.speed import _opts

    common = dict(step="recall", size="tiny", adapter_scope="recall", batch=2, memories=4, steps=2)
    off = run(_opts(**common, warmup=1, context_cache_mb=0, work=str(tmp_path / "off")))
    assert off["context_cache_misses_timed"] is None and off["context_tokens_run"] > 0
    on = run(_opts(**common, warmup=12, context_cache_mb=64, work=str(tmp_path / "on")))
    assert on["context_cache_misses_timed"] == 0 and on["contexts_cached"]
    assert on["context_tokens_run"] == 0
    assert on["tflops_per_second"] / on["tokens_per_second"] < off["tflops_per_second"] / off["tokens_per_second"]
