"""Any causal LM: the whole pipeline (steps 1-4, publish, one recall through chat.py) on tiny
random-initialised models of the common families, with and without a chat template, with tied
and untied embeddings; the LoRA targets `auto` picks per family; the plain prompt format."""
import copy
import json

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

import chat
import run_training
from memory.publish import resolve_current
from memory.token_manager import end_of_turn_id, plain_chat_text, safe_chat_template, stop_ids

FACTS = ["The user lives in Porto.", "The user has a dog called Max.", "The user works as a nurse."]

# family -> (config kwargs, the block projections step 1's `auto` adapts with the activated adapter)
FAMILIES = {
    "llama": (dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2),
              "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
    "qwen2": (dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2),
              "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
    "gemma3": (dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32),
               "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
    "mistral": (dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2),
                "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
    "phi3": (dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4), "o_proj,qkv_proj,gate_up_proj,down_proj"),
    "gpt2": (dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512), "c_attn,c_proj,c_fc"),
    "gpt_neox": (dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4), "query_key_value,dense,dense_h_to_4h,dense_4h_to_h"),
}


def _model_dir(tmp_path, tokenizer, family: str, template: bool, tied: bool):
    kwargs, _ = FAMILIES[family]
    kwargs = dict(kwargs)
    config = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=len(tokenizer), tie_word_embeddings=tied,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                  bos_token_id=tokenizer.bos_token_id, **kwargs)
    model = AutoModelForCausalLM.from_config(config)
    tok = copy.deepcopy(tokenizer)
    if not template:
        tok.chat_template = None
    path = tmp_path / f"{family}-model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _train(model_dir, tmp_path, *extra) -> int:
    mem = tmp_path / "m.jsonl"
    mem.write_text("\n".join(json.dumps({"text": t, "user_id": "alex"}) for t in FACTS) + "\n")
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in [
        ("Say hi.", "Hi there!"), ("Name a colour.", "Blue.")]) + "\n")
    return run_training.main(["--model_name_or_path", str(model_dir), "--chats_dir", "", "--precision", "fp32",
                              "--output_dir", str(tmp_path / "out"), "--num_train_epochs", "1",
                              "--per_device_train_batch_size", "4", "--lora_r", "4", "--k_folds", "0",
                              "--memories", str(mem), "--sft_data", str(sft), "--sft_self_distill", "false",
                              "--decode_epochs", "1", "--decode_min_steps", "0", "--decode_lora_r", "4",
                              "--decode_projector_hidden", "32", "--disable_tqdm", "true", *extra])


@pytest.mark.parametrize("family, template, tied", [
    ("llama", True, True), ("llama", False, False), ("qwen2", False, False), ("gemma3", True, True),
    ("mistral", False, False), ("phi3", True, False), ("gpt2", False, True), ("gpt_neox", True, False)])
def test_the_whole_pipeline_and_a_recall_on_each_family(tmp_path, tokenizer, capsys, family, template, tied):
    model_dir = _model_dir(tmp_path, tokenizer, family, template, tied)
    assert _train(model_dir, tmp_path) == 0
    version = resolve_current(tmp_path / "out" / "models")
    config = json.loads((version / "recall_config.json").read_text())
    assert config["adapter_scope"] == "recall"
    step1 = json.loads(next((tmp_path / "out" / "runs").glob("*/recall/recall_config.json")).read_text())
    assert step1["lora_target_modules"] == FAMILIES[family][1]  # `auto`, read off the family's blocks
    capsys.readouterr()
    assert chat.main(["--output_dir", str(tmp_path / "out"), "--ask", "Where do I live?", "--user", "alex",
                      "--threshold", "-1", "--max_new_tokens", "8", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "[recall] score" in out and any(f"| {fact}" in out for fact in FACTS)  # a verified stored memory


@pytest.mark.parametrize("family", ["phi3", "gpt2"])
def test_the_adapter_at_every_position_targets_the_fused_query_value_projection(tmp_path, tokenizer, family):
    model_dir = _model_dir(tmp_path, tokenizer, family, True, False)
    assert _train(model_dir, tmp_path, "--adapter_scope", "all") == 0
    step1 = json.loads(next((tmp_path / "out" / "runs").glob("*/recall/recall_config.json")).read_text())
    assert step1["lora_target_modules"] == {"phi3": "qkv_proj", "gpt2": "c_attn"}[family]


def test_a_target_another_family_names_is_an_error_listing_this_models_projections(tmp_path, tokenizer, capsys):
    model_dir = _model_dir(tmp_path, tokenizer, "gpt2", True, True)
    assert _train(model_dir, tmp_path, "--lora_target_modules", "q_proj,v_proj", "--stage", "recall") == 1
    err = capsys.readouterr().err
    assert "q_proj, v_proj not in this model's blocks" in err and "c_attn, c_proj, c_fc" in err
    assert "Traceback" not in err and sum(line.startswith("error:") for line in err.splitlines()) == 1


def test_without_a_chat_template_prompts_are_role_prefixed_lines(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "Where do I live? <recall>"},
                {"role": "assistant", "content": "In Porto."}, {"role": "user", "content": "Thanks"}]
    text = safe_chat_template(tok, messages, add_generation_prompt=True)
    assert text == "User: Where do I live? ‹recall›\nAssistant: In Porto.\nUser: Thanks\nAssistant: "
    assert plain_chat_text([{"role": "system", "content": "Be brief."}]) == "System: Be brief.\n"
    assert end_of_turn_id(tok) == tok.eos_token_id  # no template: an answer ends with EOS


def test_the_end_of_turn_token_is_read_from_the_template(tokenizer):
    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == "<|im_end|>"  # ChatML
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert tok.convert_ids_to_tokens(end_of_turn_id(tok)) == "<|eot|>"
    assert set(stop_ids(tok)) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|eot|>")}
    strict = copy.deepcopy(tokenizer)  # a template that refuses a system turn (Mistral's, Gemma's older ones)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                            "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    assert safe_chat_template(strict, [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]) == \
        "[user] hi\n"
