"""Packed step-2 batches (``DecodingCollator(packed=True)``, ``recall.packing``): one row, no
padding, attention within each sample. On this CPU the attention is the masked reference; the
FlashAttention varlen kernel runs on a GPU (``bench/gpu_check.sh``, ``--check_packing``)."""
import pytest
import torch
import torch.nn.functional as F

from memory.decoding_step import SampleBuilder
from memory.sft_data import SFTExample
from recall.packing import ATTENTION, sample_by_sample_varlen, packed_attention, varlen_attention_forward
from recall.text_memory_train import (IGNORE, DecodingCollator, EnhancedTextMemoryTrainer, MemoryDecodingArguments,
                                      ResampledDataset)
from tests.test_activation import FACTS, _activated_decoder, _randomise_lora


def _block_causal_reference(q, k, v, cu, scale):
    """Attention over the whole packed row under a block-diagonal causal mask."""
    total, groups = q.shape[0], q.shape[1] // k.shape[1]
    steps = torch.arange(total)
    segment = torch.searchsorted(cu[1:], steps, right=True)
    mask = (segment[:, None] == segment[None, :]) & (steps[None, :] <= steps[:, None])
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         scale=scale)
    return out.transpose(0, 1)


def _qkv():
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 6, 15, 18])
    return torch.randn(18, 4, 8), torch.randn(18, 2, 8), torch.randn(18, 2, 8), cu


def test_cpu_varlen_equals_block_diagonal_causal_attention():
    q, k, v, cu = _qkv()
    out = sample_by_sample_varlen(q, k, v, cu, scale=0.3, groups=2)
    assert torch.allclose(out, _block_causal_reference(q, k, v, cu, 0.3), atol=1e-5)


@pytest.mark.parametrize("style", ["torch 2.10", "later"])
def test_flash_call_adapts_to_the_kernels_signature(monkeypatch, style):
    """``varlen_attn`` took ``is_causal`` in torch 2.10 and ``window_size`` / ``scale`` /
    ``enable_gqa`` later; the call is built from the signature found. A stand-in kernel with
    each signature (computing the reference attention) must give the reference result."""
    from recall import packing

    q, k, v, cu = _qkv()
    seen = {}

    if style == "torch 2.10":
        def kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            seen.update(is_causal=is_causal, heads=key.shape[1])
            assert is_causal and key.shape[1] == query.shape[1]  # no GQA argument: heads repeated for it
            return _block_causal_reference(query, key, value, cu_seq_q, query.shape[-1] ** -0.5)
        params = {"is_causal", "return_aux"}
    else:
        def kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1), enable_gqa=False):
            seen.update(window=window_size, gqa=enable_gqa)
            assert window_size == (-1, 0) and enable_gqa
            return _block_causal_reference(query, key, value, cu_seq_q, scale)
        params = {"return_aux", "scale", "window_size", "enable_gqa"}
    monkeypatch.setitem(packing._VARLEN, "fn", kernel)
    monkeypatch.setitem(packing._VARLEN, "params", frozenset(params))
    scale = 8 ** -0.5
    out = packing._flash_varlen(q, k, v, cu, 64, scale, groups=2)
    assert seen and torch.allclose(out, _block_causal_reference(q, k, v, cu, scale), atol=1e-5)
    if style == "torch 2.10":  # no scale argument: a model scaling otherwise is refused, not silently wrong
        with pytest.raises(RuntimeError, match="no scale argument"):
            packing._flash_varlen(q, k, v, cu, 64, 0.5, groups=2)


def test_varlen_attention_refuses_a_call_without_the_packed_plan():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        varlen_attention_forward(None, q, q, q, None)
    with pytest.raises(ValueError, match="one row"):
        varlen_attention_forward(None, torch.randn(2, 2, 4, 8), q, q, None, cu_seq_lens_q=torch.tensor([0, 4]),
                                 max_length_q=4)


def _batches(tok, model, bank, anchors, kd, builder):
    samples = [builder.memory_sample(0, 0), builder.sandwich_sample(1, 1), builder.sft_sample(1),
               builder.memory_sample(2, 1), builder.sft_sample(0)]
    common = dict(anchors=anchors, kd=kd, recall_id=model.recall_id)
    padded = DecodingCollator(tok.pad_token_id, bank, model.pad_id, **common)(samples)
    packed = DecodingCollator(tok.pad_token_id, bank, model.pad_id, packed=True, **common)(samples)
    return samples, padded, packed


def test_packed_batch_gives_the_padded_batchs_losses_and_gradients(tokenizer, tmp_path):
    """Same samples, two layouts: every loss part (LM, KD, recall, preserve) and every gradient
    agree, and the packed row holds no padding."""
    model, tok, ids, bank, args, base = _activated_decoder(tokenizer, tmp_path, adapter_scope="all")
    _randomise_lora(model)
    model.loss_weights.update(recall=0.5, preserve=2.0, kd=1.0)
    sft = [SFTExample("Say hi.", "Hi there!"), SFTExample("Name a colour.", "Blue, like the sea.")]
    builder = SampleBuilder(tok, FACTS, [["Tell me.", "Where?"]] * 3, sft, max_length=128, mix="2:1:1")
    kd = builder.teacher_topk(base, k=8)
    anchors = F.normalize(torch.randn(16, 64), dim=-1)
    samples, padded, packed = _batches(tok, model, bank, anchors, kd, builder)
    lengths = [len(s["input_ids"]) for s in samples]
    assert packed["input_ids"].shape == (1, sum(lengths)) < padded["input_ids"].shape
    plan = packed["plan"]
    assert plan["cu_seq_lens"].tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
    assert plan["position_ids"][0, lengths[0]] == 0 and plan["max_length"] % 64 == 0
    assert plan["kd_select"].numel() and plan["recall_rows"].numel() and plan["preserve_rows"].numel()
    assert (packed["labels"] != IGNORE).sum() == (padded["labels"][:, 1:] != IGNORE).sum()
    model.eval()  # no injection noise
    results = {}
    for name, batch in (("padded", padded), ("packed", packed)):
        out = model(**batch)
        out["loss"].backward()
        results[name] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    (a, ga), (b, gb) = results["padded"], results["packed"]
    for key in ("loss", "lm", "kd", "recall", "preserve"):
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert torch.allclose(ga[name], gb[name], rtol=1e-4, atol=1e-5), name  # summation order differs
    with torch.no_grad():  # and position by position, the hidden states of each sample
        h_pad = model.hidden_states(padded["input_ids"], padded["attention_mask"], padded["memory_vectors"],
                                    padded["plan"])
        h_pack = model.hidden_states(packed["input_ids"], packed["attention_mask"], packed["memory_vectors"], plan)
        for b_, (start, n) in enumerate(zip(plan["cu_seq_lens"].tolist(), lengths)):
            assert torch.allclose(h_pack[0, start:start + n], h_pad[b_, :n], atol=1e-5)
    assert model.lm.config._attn_implementation != ATTENTION  # switched on for the packed forward only


def test_packed_attention_restores_the_models_attention_after_an_error(tokenizer, tmp_path):
    model, *_ = _activated_decoder(tokenizer, tmp_path, adapter_scope="all")
    before = model.lm.config._attn_implementation
    with pytest.raises(RuntimeError):
        with packed_attention(model.lm):
            assert model.lm.config._attn_implementation == ATTENTION
            raise RuntimeError("boom")
    assert model.lm.config._attn_implementation == before


def test_packing_trains_and_the_decode_check_reads_padded_rows(tokenizer, tmp_path):
    """A few steps through ``EnhancedTextMemoryTrainer`` with ``packing``: the loss falls, and
    the per-epoch decode check (a padded batch) gives the same rate as a padded collator."""
    model, tok, ids, bank, args, base = _activated_decoder(tokenizer, tmp_path, adapter_scope="all", packing=True,
                                                           num_train_epochs=4, per_device_train_batch_size=4,
                                                           stop_at_exact_match=0.0)
    builder = SampleBuilder(tok, FACTS, [["Tell me.", "Where?"]] * 3, [SFTExample("Say hi.", "Hi there!")],
                            max_length=128, mix="2:1:1")
    data = ResampledDataset(builder.epoch, seed=0)
    checks = [builder.memory_sample(row, 0) for row in range(len(FACTS))]
    trainer = EnhancedTextMemoryTrainer(model, args, bank, tok, data, check_samples=checks)
    assert trainer.data_collator.packed and not trainer.data_collator.padded().packed
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 4 and losses[-1] < losses[0]
    rates = [h["decode_exact_match"] for h in trainer.state.log_history if "decode_exact_match" in h]
    assert len(rates) == 4
    trainer.data_collator = trainer.data_collator.padded()
    assert trainer.decode_check() == pytest.approx(rates[-1])


def test_packing_needs_the_adapter_at_every_position(tmp_path):
    with pytest.raises(ValueError, match="adapter_scope 'all'"):
        MemoryDecodingArguments(output_dir=str(tmp_path), packing=True, adapter_scope="recall", use_cpu=True)
    with pytest.raises(ValueError, match="recall_id"):
        DecodingCollator(0, torch.zeros(1, 4), 1, packed=True)


def test_decode_packing_option(tmp_path):
    """``--decode_packing`` reaches step 2's arguments, and is refused up front with the activated
    adapter (step 1's default), before any model loads."""
    from memory.config import parse_args

    with pytest.raises(ValueError, match="--adapter_scope all"):
        parse_args(["--output_dir", str(tmp_path), "--decode_packing"])
    from memory.training_service import MemoryTrainingService

    service = MemoryTrainingService(*parse_args(["--output_dir", str(tmp_path / "w"), "--decode_packing",
                                                 "--adapter_scope", "all", "--chats_dir", "", "--use_cpu"]))
    assert service.args.decode_packing and service.train_args.adapter_scope == "all"
    assert service.decoding_arguments(tmp_path / "d").packing
