"""Regional torch.compile (--compile_layers): the compiled blocks compute what the eager ones
do, and the combinations it cannot serve are refused with a clear error."""
import copy
import json

import pytest
import torch

from memory.config import parse_args
from memory.decoding_step import SampleBuilder
from memory.sft_data import SFTExample
from memory.token_manager import MEMORY_PAD_TOKEN, add_memory_tokens
from recall.compilation import compile_layers, decoder_layers
from recall.text_memory_train import DecodingCollator, MemoryDecodingArguments, build_decoder_model
from tests.conftest import make_tiny_model

FACTS = ["The user lives in Porto.", "The user has a dog called Max.", "The user works as a nurse."]
SFT = [SFTExample("Say hi.", "Hi there!"), SFTExample("Name a colour.", "Blue.")]


def _step(lm, tok, ids, tmp_path, compiled: bool):
    """One forward + backward of step 2's model on a mixed batch; (loss parts, gradients)."""
    args = MemoryDecodingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, lora_r=8, lora_alpha=16,
                                   projector_hidden=64, compile_layers=compiled)
    torch.manual_seed(0)
    model = build_decoder_model(copy.deepcopy(lm), ids, args, memory_dim=64).eval()  # eval: no injection noise
    with torch.no_grad():  # non-zero LoRA B, so the adapters' path is part of what is compared
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    builder = SampleBuilder(tok, FACTS, [["where does the user live?"]] * 3, SFT, max_length=96)
    samples = [builder.sft_sample(0), builder.memory_sample(2, 0), builder.sandwich_sample(1, 1)]
    batch = DecodingCollator(tok.pad_token_id, torch.randn(3, 64, generator=torch.Generator().manual_seed(1)),
                             ids[MEMORY_PAD_TOKEN])(samples)
    out = model(**batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    layers = decoder_layers(model.lm)
    return out, grads, [getattr(layer, "_compiled_call_impl", None) is not None for layer in layers]


def test_compiled_blocks_give_the_eager_loss_and_gradients(tokenizer, tmp_path):
    tok = copy.deepcopy(tokenizer)
    lm = make_tiny_model(tok)
    ids = add_memory_tokens(lm, tok)
    eager, eager_grads, eager_flags = _step(lm, tok, ids, tmp_path, compiled=False)
    torch._dynamo.reset()
    compiled, compiled_grads, flags = _step(lm, tok, ids, tmp_path, compiled=True)
    assert not any(eager_flags) and all(flags) and len(flags) == lm.config.num_hidden_layers
    for part in ("loss", "lm"):
        assert torch.allclose(eager[part], compiled[part], rtol=1e-4, atol=1e-5), part
    assert eager_grads.keys() == compiled_grads.keys() and any("lora_A" in n for n in eager_grads)
    for name, grad in eager_grads.items():
        if "lora_" in name:  # (the projector's first layer has none: its output layer starts at zero)
            assert grad.abs().sum() > 0, name
        assert torch.allclose(grad, compiled_grads[name], rtol=1e-3, atol=1e-5), name


def test_zero3_is_refused_before_any_model_loads(tmp_path):
    config = tmp_path / "z3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    with pytest.raises(ValueError, match="compile_layers.*ZeRO-3"):
        parse_args(["--output_dir", str(tmp_path / "w"), "--compile_layers", "--deepspeed", str(config), "--use_cpu"])
    with pytest.raises(ValueError, match="ZeRO-3"):
        compile_layers(torch.nn.Module(), {"zero_optimization": {"stage": 3}})


def test_a_model_without_transformer_blocks_gets_a_clear_error():
    with pytest.raises(ValueError, match="no transformer blocks"):
        compile_layers(torch.nn.Linear(2, 2))


def test_the_flag_reaches_step_2(tmp_path):
    from memory.training_service import MemoryTrainingService

    service = MemoryTrainingService(*parse_args(["--output_dir", str(tmp_path / "w"), "--compile_layers",
                                                 "--chats_dir", "", "--use_cpu"]))
    assert service.train_args.compile_layers
    assert service.decoding_arguments(tmp_path / "d").compile_layers
