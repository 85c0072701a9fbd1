"""recall/cpu_bf16.py: bf16 copies of frozen linear weights and fp32 attention, inside CPU bf16
autocast training only, with the numbers autocast gives and nothing left behind."""
from types import SimpleNamespace

import torch
from peft import LoraConfig, get_peft_model

from recall.cpu_bf16 import ATTENTION, applies, bf16_cpu_training
from tests.conftest import make_tiny_model

BF16_CPU = SimpleNamespace(bf16=True, deepspeed=None)


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_applies_only_to_cpu_bf16_autocast_without_deepspeed():
    assert applies(BF16_CPU, "cpu")
    assert not applies(SimpleNamespace(bf16=False, deepspeed=None), "cpu")
    assert not applies(BF16_CPU, "cuda")
    assert not applies(SimpleNamespace(bf16=True, deepspeed="ds_configs/zero2.json"), "cpu")


def test_frozen_linears_give_autocasts_numbers_and_are_restored(tokenizer):
    torch.manual_seed(0)
    model = get_peft_model(make_tiny_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():  # a non-zero update, so the LoRA path counts in the comparison
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 500, (2, 9))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with _autocast():
        expected = model(input_ids=ids).logits.float()
    plain = model(input_ids=ids).logits
    base = model.get_base_model()
    with bf16_cpu_training(model, BF16_CPU, "cpu"):
        shadowed = [m for m in model.modules() if "forward" in m.__dict__]
        # every frozen linear of the base (the LM head too); no LoRA matrix, which is trained
        assert len(shadowed) == 2 * 7 + 1 and all(not m.weight.requires_grad for m in shadowed)
        assert base.model.layers[0].self_attn.config._attn_implementation == ATTENTION
        with _autocast():
            got = model(input_ids=ids).logits.float()
        outside = model(input_ids=ids).logits  # no autocast: the fp32 weights
    # the linears' numbers are autocast's (the same bf16 rounding); attention in fp32 differs
    # from bf16 attention only by bf16 rounding of its inputs
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)
    torch.testing.assert_close(outside, plain)
    assert not any("forward" in m.__dict__ for m in model.modules() if type(m) is torch.nn.Linear)
    assert base.config._attn_implementation == "sdpa"
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, weights[n]), n


def test_a_shadowed_linear_is_bit_identical_to_autocast():
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40).requires_grad_(False)
    x = torch.randn(5, 48, requires_grad=True)
    with _autocast():
        expected = layer(x)
    holder = torch.nn.Sequential(layer)
    with bf16_cpu_training(holder, BF16_CPU, "cpu"):
        with _autocast():
            got = layer(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    got.float().sum().backward()  # the gradient reaches the input through the bf16 copy
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_fp32_attention_keeps_the_padding_mask(tokenizer):
    """A left-padded row gives the states of the same row unpadded: the attention function has
    SDPA's mask (a custom attention name gets no mask from transformers unless registered)."""
    model = make_tiny_model(tokenizer)
    ids = torch.randint(1, 500, (1, 7))
    pad = torch.full((1, 3), tokenizer.pad_token_id)
    batch = torch.cat([torch.cat([pad, ids], 1), torch.randint(1, 500, (1, 10))])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with bf16_cpu_training(model, BF16_CPU, "cpu"), _autocast():
        alone = model.model(input_ids=ids).last_hidden_state.float()
        padded = model.model(input_ids=batch, attention_mask=mask, position_ids=positions).last_hidden_state.float()
    torch.testing.assert_close(padded[0, 3:], alone[0], atol=0.03, rtol=0.03)


def test_restored_after_an_error(tokenizer):
    model = make_tiny_model(tokenizer)
    try:
        with bf16_cpu_training(model, BF16_CPU, "cpu"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in m.__dict__ for m in model.modules())


# ------------------------------------------------ --train_precision (recall.model_loading)
def _args(**kw):
    from recall.text_embedding_train import RecallTrainingArguments

    return RecallTrainingArguments(output_dir="unused", report_to="none", **kw)


def test_training_follows_the_cpu_runtime_unless_told():
    from recall.model_loading import Runtime, resolve_training_precision

    cpu_bf16 = Runtime(torch.device("cpu"), torch.float32, torch.bfloat16)
    cpu_fp32 = Runtime(torch.device("cpu"), torch.float32, None)
    on = resolve_training_precision(_args(), cpu_bf16, "auto")
    assert on.bf16 and on.use_cpu and on.mixed_precision == "bf16"  # what the Trainer's accelerator reads
    assert not resolve_training_precision(_args(), cpu_fp32, "auto").bf16
    assert not resolve_training_precision(_args(), cpu_bf16, "fp32").bf16
    assert resolve_training_precision(_args(), cpu_fp32, "bf16").bf16
    gpu = Runtime(torch.device("cuda"), torch.bfloat16, None)
    assert not resolve_training_precision(_args(), gpu, "bf16").bf16  # a GPU's weights carry the precision
    zero2 = SimpleNamespace(bf16=False, fp16=False, deepspeed="ds_configs/zero2.json")
    assert resolve_training_precision(zero2, cpu_bf16, "auto") is zero2  # bf16 there casts the whole model
    given = _args(bf16=True, use_cpu=True)
    assert resolve_training_precision(given, cpu_fp32, "fp32") is given  # HF's own flag decides


def test_a_bad_train_precision_is_refused_when_parsed():
    import pytest

    from memory.config import parse_args

    with pytest.raises(ValueError, match="--train_precision: expected auto, bf16 or fp32, got 'fast'"):
        parse_args(["--output_dir", "unused", "--train_precision", "fast"])
