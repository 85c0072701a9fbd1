"""GGUF files of several tensor types load through the one path (dequantized once into a plain
checkpoint); an unreadable GGUF gets a one-line error. The tiny GGUFs are written here with the
gguf package, with the default model's tokenizer metadata copied from its packaged GGUF."""
import numpy as np
import pytest

import gguf
from recall.model_loading import (DEFAULT_GGUF_FILE, ModelError, _default_package_dir, load_model_and_tokenizer)

H, FF, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2  # 256: the smallest row the block quantizations need


@pytest.fixture(scope="module")
def tokenizer_fields():
    reader = gguf.GGUFReader(str(_default_package_dir() / DEFAULT_GGUF_FILE))
    return [(key, f.contents(), f.types) for key, f in reader.fields.items() if key.startswith("tokenizer.")]


def _write(path, tokenizer_fields, tensor_type: str, arch: str = "llama") -> dict:
    """A tiny Llama-shaped GGUF whose matrices are stored as ``tensor_type``; returns what it
    stored, read back in fp32."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(H // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    vocab = 0
    for key, value, types in tokenizer_fields:
        if types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, types[0], sub_type=types[-1])
            vocab = max(vocab, len(value)) if key == "tokenizer.ggml.tokens" else vocab
        else:
            w.add_key_value(key, value, types[0])
    shapes = {"token_embd.weight": (vocab, H), "output_norm.weight": (H,)}
    for i in range(LAYERS):
        kv = H * KV_HEADS // HEADS
        shapes.update({f"blk.{i}.attn_norm.weight": (H,), f"blk.{i}.ffn_norm.weight": (H,),
                       f"blk.{i}.attn_q.weight": (H, H), f"blk.{i}.attn_k.weight": (kv, H),
                       f"blk.{i}.attn_v.weight": (kv, H), f"blk.{i}.attn_output.weight": (H, H),
                       f"blk.{i}.ffn_gate.weight": (FF, H), f"blk.{i}.ffn_up.weight": (FF, H),
                       f"blk.{i}.ffn_down.weight": (H, FF)})
    rng = np.random.default_rng(0)
    written = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.add_tensor(name, np.ones(shape, np.float32))
            continue
        a = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        if tensor_type == "F16":
            w.add_tensor(name, a.astype(np.float16))
            written[name] = a.astype(np.float16).astype(np.float32)
        else:
            qtype = getattr(gguf.GGMLQuantizationType, tensor_type)
            stored = gguf.quants.quantize(a, qtype)
            w.add_tensor(name, stored, raw_dtype=qtype)
            written[name] = gguf.quants.dequantize(stored, qtype)  # what the file holds, by gguf's own reading
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@pytest.mark.parametrize("tensor_type", ["F16", "Q8_0", "Q4_0"])
def test_each_tensor_type_loads_through_the_same_path(tmp_path, monkeypatch, tokenizer_fields, tokenizer, tensor_type):
    monkeypatch.setenv("RECALL_MEMORY_CACHE", str(tmp_path / "cache"))
    written = _write(tmp_path / f"tiny-{tensor_type}.gguf", tokenizer_fields, tensor_type)
    loaded = load_model_and_tokenizer(str(tmp_path / f"tiny-{tensor_type}.gguf"), precision="fp32")
    # (q and k are stored permuted for llama.cpp's rotary layout, so compare v and the MLP)
    v = loaded.model.model.layers[0].self_attn.v_proj.weight.detach().numpy()
    down = loaded.model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    assert np.abs(v - written["blk.0.attn_v.weight"]).max() < 1e-6  # dequantized to exactly what was stored
    assert np.abs(down - written["blk.1.ffn_down.weight"]).max() < 1e-6
    assert not getattr(loaded.model, "is_quantized", False)  # a plain model: it trains and saves
    assert loaded.tokenizer("Where do I live?")["input_ids"] == tokenizer("Where do I live?")["input_ids"]
    assert loaded.source.kind == "gguf" and (tmp_path / "cache" / "gguf-converted").is_dir()


def test_an_architecture_transformers_cannot_read_is_a_one_line_error(tmp_path, monkeypatch, tokenizer_fields):
    monkeypatch.setenv("RECALL_MEMORY_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-rwkv.gguf"
    _write(path, tokenizer_fields, "F16", arch="rwkv6")
    with pytest.raises(ModelError, match=r"tiny-rwkv\.gguf: transformers cannot load this GGUF \(.*rwkv6") as info:
        load_model_and_tokenizer(str(path), precision="fp32")
    assert "\n" not in str(info.value)


def test_a_missing_gguf_package_is_named(tmp_path, monkeypatch, tokenizer_fields):
    import importlib.util

    monkeypatch.setenv("RECALL_MEMORY_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    _write(path, tokenizer_fields, "F16")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelError, match=r"tiny\.gguf: reading a GGUF file needs the gguf package \(python -m pip "
                                         r"install gguf=="):
        load_model_and_tokenizer(str(path), precision="fp32")
