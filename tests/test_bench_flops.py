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
