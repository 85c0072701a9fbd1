"""The activated memory adapter (``--adapter_scope recall``, ``recall.activation``) on the tiny model."""
import copy
import json

import pytest
import torch

from memory.decoding_step import SampleBuilder, exact_match_rate
from memory.publish import MANIFEST, resolve_current
from memory.sft_data import SFTExample
from memory.token_manager import RECALL_TOKEN, add_memory_tokens
from recall.activation import adapter_active, is_activated
from recall.generation import RecallEngine
from recall.text_embedding_train import (RecallCollator, RecallMemoryTrainer, RecallTrainingArguments,
                                         build_recall_model, format_query)
from recall.text_memory_train import (EnhancedTextMemoryTrainer, MemoryDecodingArguments, ResampledDataset,
                                      build_decoder_model)
from tests.conftest import make_tiny_model

FACTS = ["The user lives in Porto.", "The user has a dog called Max.", "The user works as a nurse."]
ALL7 = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _recall_model(tokenizer, scope, **kw):
    tok = copy.deepcopy(tokenizer)
    lm = make_tiny_model(tok)
    ids = add_memory_tokens(lm, tok)
    args = RecallTrainingArguments(output_dir="/tmp/unused", adapter_scope=scope, lora_r=4, lora_alpha=8,
                                   lora_target_modules=ALL7, **kw)
    return build_recall_model(lm, tok, args, 64, list(ids.values())).eval(), tok, ids


def _randomise_lora(model, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)


def test_step1_query_is_pefts_own_alora_forward(tokenizer):
    model, tok, ids = _recall_model(tokenizer, "recall")
    assert is_activated(model.lm)
    texts = [format_query(tok, t) for t in ("The user lives in Porto.", "hi", "a longer context " * 6)]
    collate = RecallCollator(tok, ids[RECALL_TOKEN], 96)
    batch = collate([{"text": t} for t in texts])
    with torch.no_grad():
        zero = model(batch["input_ids"], batch["attention_mask"])
    full, _, _ = _recall_model(tokenizer, "all")
    with torch.no_grad():  # same weights (seeded), zero adapter: both scopes read the same state
        assert torch.allclose(zero, full(batch["input_ids"], batch["attention_mask"]), atol=1e-5)
    _randomise_lora(model)
    for text in texts:  # reference: PEFT computes the aLoRA offsets from input_ids itself
        enc = tok(text, add_special_tokens=False, return_tensors="pt")
        last = torch.tensor([enc["input_ids"].shape[1] - 1])
        with torch.no_grad():
            reference = model.lm(**enc).logits[0, -1]
            ours = model.lm.get_output_embeddings()(
                model._recall_position_state(enc["input_ids"], enc["attention_mask"], torch.arange(1), last))[0]
            with model.lm.disable_adapter():
                base = model.lm(**enc).logits[0, -1]
        assert torch.allclose(ours, reference, atol=1e-4)
        assert (reference - base).abs().max() > 0.1  # the adapter does act at <recall>


def test_step1_batches_padding_and_the_context_cache_agree(tokenizer):
    model, tok, ids = _recall_model(tokenizer, "recall")
    _randomise_lora(model)
    texts = [format_query(tok, t) for t in ("The user lives in Porto.", "hi", "a longer context " * 6)]
    collate = RecallCollator(tok, ids[RECALL_TOKEN], 96)
    batch = collate([{"text": t} for t in texts])
    with torch.no_grad():
        first = model(batch["input_ids"], batch["attention_mask"])  # fills the cache
        second = model(batch["input_ids"], batch["attention_mask"])  # reads it
        alone = torch.cat([model(**collate([{"text": t}])) for t in texts])
        left = tok(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        left_q = model(left["input_ids"], left["attention_mask"])
    assert model.context_cache.hits >= 3 and len(model.context_cache.entries) == 3
    cache, model.context_cache = model.context_cache, None
    with torch.no_grad():
        uncached = model(batch["input_ids"], batch["attention_mask"])
    for q in (first, second, alone, left_q):
        assert torch.allclose(q, uncached, atol=1e-5)
    model.context_cache = type(cache)(cache.config, 64, list(ids.values()))  # empty, filled from left padding
    with torch.no_grad():
        assert torch.allclose(model(left["input_ids"], left["attention_mask"]), uncached, atol=1e-5)
        assert torch.allclose(model(batch["input_ids"], batch["attention_mask"]), uncached, atol=1e-5)
    assert model.context_cache.hits == 3
    cache.budget = 0  # over budget: computed, not stored
    cache.entries.clear()
    with torch.no_grad():
        model.context_cache = cache
        assert torch.allclose(model(batch["input_ids"], batch["attention_mask"]), uncached, atol=1e-5)
    assert not cache.entries


def test_step1_training_leaves_text_without_recall_to_the_base_model(tokenizer, tmp_path):
    tok = copy.deepcopy(tokenizer)
    lm = make_tiny_model(tok)
    ids = add_memory_tokens(lm, tok)
    base = copy.deepcopy(lm)
    torch.manual_seed(1)
    bank = torch.nn.functional.normalize(torch.randn(len(FACTS), 64), dim=-1)
    data = [{"text": format_query(tok, f), "target": i} for i, f in enumerate(FACTS)] * 4
    args = RecallTrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4,
                                   num_train_epochs=6, learning_rate=5e-3, logging_steps=1, save_strategy="no",
                                   lora_r=4, lora_alpha=8, use_cpu=True, seed=0, temperature=0.05,
                                   lora_target_modules=ALL7, adapter_scope="recall")
    model = build_recall_model(lm, tok, args, memory_dim=64, token_ids=list(ids.values()))
    trainer = RecallMemoryTrainer(model=model, args=args, memory_bank=bank, tokenizer=tok,
                                  recall_token_id=ids[RECALL_TOKEN], train_dataset=data, eval_dataset=data[:3])
    before = trainer.evaluate()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] * 0.7
    assert trainer.evaluate()["eval_recall_at_1"] > before["eval_recall_at_1"]
    assert model.context_cache.hits > 0  # later epochs reuse the contexts' KV caches
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora)
    text = tok("The weather is nice today, isn't it?", return_tensors="pt")
    with torch.no_grad():  # no <recall>: the trained model is the base model, bit for bit
        assert torch.equal(model.lm(**text).logits, base(**text).logits)


def _activated_decoder(tokenizer, tmp_path, **kw):
    tok = copy.deepcopy(tokenizer)
    lm = make_tiny_model(tok, initializer_range=0.3)
    ids = add_memory_tokens(lm, tok)
    base = copy.deepcopy(lm)
    options = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=3, learning_rate=1e-2,
                   logging_steps=1, save_strategy="no", lora_r=8, lora_alpha=16, use_cpu=True, seed=0,
                   projector_hidden=64, num_train_epochs=1, min_steps=0, warmup_ratio=0.0,
                   lora_target_modules="q_proj,v_proj,o_proj,up_proj,down_proj", adapter_scope="recall")
    args = MemoryDecodingArguments(**{**options, **kw})
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(len(FACTS), 64), dim=-1)
    return build_decoder_model(lm, ids, args, memory_dim=64, memory_bank=bank), tok, ids, bank, args, base


def test_step2_two_passes_equal_one_activated_pass(tokenizer, tmp_path):
    model, tok, ids, bank, args, _ = _activated_decoder(tokenizer, tmp_path)
    model.eval()
    _randomise_lora(model)
    builder = SampleBuilder(tok, FACTS, [["Tell me.", "Where?"]] * 3,
                            [SFTExample("Say hi.", "Hi there!"), SFTExample("Name a colour.", "Blue.")],
                            max_length=128, mix="2:1:1")
    samples = [builder.memory_sample(0, 0), builder.sandwich_sample(1, 1), builder.memory_sample(2, 1),
               builder.sft_sample(0)]
    batch = EnhancedTextMemoryTrainer(model=model, args=args, memory_vectors=bank, tokenizer=tok,
                                      train_dataset=samples).data_collator(samples)
    with torch.no_grad():
        two_pass = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["memory_vectors"])
        vectors = iter(batch["memory_vectors"])
        for b, sample in enumerate(samples):  # one row at a time, adapter from <recall> on, as PEFT's aLoRA
            n = len(sample["input_ids"])
            row = torch.tensor([sample["input_ids"]])
            start = sample["input_ids"].index(ids[RECALL_TOKEN]) if ids[RECALL_TOKEN] in sample["input_ids"] else n
            pads = sample["input_ids"].count(model.pad_id)
            vec = torch.stack([next(vectors) for _ in range(pads)]) if pads else None
            with adapter_active(model.lm, [n - start]):
                one = model.lm.get_base_model().model(inputs_embeds=model.embed(row, vec)).last_hidden_state[0]
            assert torch.allclose(two_pass[b, :n], one, atol=1e-4), b


def test_step2_memories_decode_and_chat_without_recall_is_the_base_model(tokenizer, tmp_path):
    model, tok, ids, bank, args, base = _activated_decoder(tokenizer, tmp_path, num_train_epochs=100,
                                                           stop_at_exact_match=1.0)
    sft = [SFTExample("Say hi.", "Hi there!"), SFTExample("Name a colour.", "Blue.")]
    builder = SampleBuilder(tok, FACTS, [["Tell me."]] * 3, sft, max_length=128, mix="2:1:0")
    checks = [builder.memory_sample(row, 0) for row in range(len(FACTS))]
    trainer = EnhancedTextMemoryTrainer(model=model, args=args, memory_vectors=bank, tokenizer=tok,
                                        train_dataset=ResampledDataset(builder.epoch, seed=0), check_samples=checks)
    trainer.train()
    assert trainer.state.epoch < 100  # the teacher-forced check reached 1.0
    model.eval()
    lm = model.merged_lm()
    assert is_activated(lm)
    engine = RecallEngine(lm, tok, ids, model.projector)
    # the recall loop switches the adapter on at <recall> on the KV cache: it must decode what
    # the two-pass training taught
    assert exact_match_rate(engine.decode_memories(bank.numpy(), context="Tell me."), FACTS) == 1.0
    text = tok("Name a colour.", return_tensors="pt")
    vocab = min(ids.values())  # the original vocabulary; the memory tokens' own rows were trained
    with torch.no_grad():
        assert torch.allclose(lm(**text).logits[..., :vocab], base(**text).logits[..., :vocab], atol=1e-5)


def test_the_pipeline_publishes_an_activated_version(tiny_model_dir, tmp_path, capsys):
    import chat
    import evaluate
    from transformers import AutoModelForCausalLM

    from tests.test_publish import _run

    assert _run(tiny_model_dir, tmp_path, "--adapter_scope", "recall", "--lora_target_modules",
                "q_proj,v_proj,o_proj,up_proj,down_proj") == 0
    current = resolve_current(tmp_path / "out" / "models")
    manifest = json.loads((current / MANIFEST).read_text())
    assert manifest["adapter_scope"] == "recall" and "memory_adapter/adapter_model.safetensors" in manifest["files"]
    from safetensors import safe_open

    with safe_open(str(current / "memory_adapter" / "adapter_model.safetensors"), "pt") as f:
        assert all(".lora_" in k for k in f.keys())  # LoRA only: the embeddings live in the base checkpoint
    metrics = json.loads((current / "metrics.json").read_text())["decoding"]
    assert metrics["adapter_scope"] == "recall" and metrics["sft_examples"] > 0
    phases = metrics["phase_seconds"]  # step 2's time outside training, by phase
    assert {"setup", "queries", "build", "merge", "recall_after", "threshold", "decode_check"} <= set(phases)
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) < metrics["seconds"]
    # the version keeps its recall loop settings
    assert json.loads((current / "recall_config.json").read_text())["memories_per_recall"] == 1
    # recall_threshold auto: the version keeps the calibrated cosine, the lower of two bounds: at least
    # 95% of the correct training cues reach it, and, when the prompts' bound decides, at most 1% of the
    # 462 calibration prompts (never trained on) do
    from memory.sft_data import calibration_prompts

    calibrated = metrics["threshold"]
    assert json.loads((current / "recall_config.json").read_text())["recall_threshold"] == calibrated["value"]
    assert calibrated["unrelated"] == len(calibration_prompts()) == 462 and calibrated["correct_contexts"] > 0
    assert calibrated["correct_pass"] >= 0.95
    assert calibrated["decided_by"] != "unrelated prompts" or calibrated["unrelated_pass"] <= 0.01
    plain = AutoModelForCausalLM.from_pretrained(current)  # ordinary chat: the base model plus the memory tokens
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(plain(x).logits[..., :original.config.vocab_size], original(x).logits)
    models = str(tmp_path / "out" / "models")
    assert chat.main(["--model_dir", models, "--ask", "Where do I live?", "--force-recall", "--user", "alex",
                      "--threshold", "-1", "--max_new_tokens", "8", "--precision", "fp32"]) == 0
    assert "[recall] score" in capsys.readouterr().out
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([{"question": "Where do I live?", "expected": "porto", "user_id": "alex"}]))
    report = tmp_path / "r.json"
    assert evaluate.main(["--output_dir", str(tmp_path / "out"), "--questions", str(questions),
                          "--report", str(report), "--precision", "fp32"]) == 0
    from bench.threshold import measure  # the calibration, recomputed on the published version, is the version's

    thresholds = measure(str(current), str(questions))["thresholds"]
    assert thresholds["calibrated"]["threshold"] == pytest.approx(thresholds["the version's"]["threshold"], abs=1e-5)
    assert thresholds["none (0)"]["injected"] == 1.0
    forgetting = json.loads(report.read_text())["forgetting"]
    assert forgetting["greedy_agreement"] == 1.0 and forgetting["mean_kl"] < 1e-6
    # a new memory later: retrained in full by default; --incremental always continues this version's adapter
    from memory.config import MemoryArguments, ModelArguments
    from memory.training_service import MemoryTrainingService

    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"text": "The user drinks green tea.", "user_id": "alex"}) + "\n")
    plans = {}
    for incremental in ("auto", "always"):
        service = MemoryTrainingService(ModelArguments(model_name_or_path=str(tiny_model_dir), precision="fp32"),
                                        MemoryArguments(chats_dir="", incremental=incremental),
                                        RecallTrainingArguments(output_dir=str(tmp_path / "out"), adapter_scope="recall"))
        try:
            if incremental == "auto":
                assert service.plan_cycle([], "all") is None  # nothing new: nothing to retrain
                service.import_memories(str(new))
            plans[incremental] = service.plan_cycle([], "all")
        finally:
            service.close()
    assert plans["auto"]["mode"] == "full" and "activated adapter is retrained in full" in plans["auto"]["reason"]
    plan = plans["always"]
    assert plan["mode"] == "incremental" and plan["base_version"] == str(current) and len(plan["new_ids"]) == 1


def test_an_unknown_scope_is_refused():
    with pytest.raises(ValueError, match="adapter_scope"):
        RecallTrainingArguments(output_dir="/tmp/x", adapter_scope="context")
    with pytest.raises(ValueError, match="adapter_scope"):
        MemoryDecodingArguments(output_dir="/tmp/x", adapter_scope="everywhere")


def _pefts_forward(lm):
    """Take the lean forward off ``lm``'s LoRA layers (the trainers install it), back to PEFT's."""
    for m in lm.modules():
        m.__dict__.pop("forward", None)


def test_lean_inference_forward_equals_pefts(tokenizer):
    from recall.activation import use_fast_forward

    model, tok, ids = _recall_model(tokenizer, "recall")
    _randomise_lora(model)
    lm = model.lm.eval()
    _pefts_forward(lm)
    x = torch.randint(100, 40000, (3, 7))
    runs = {}
    for lean in (False, True):
        if lean:
            use_fast_forward(lm)
        with torch.no_grad():
            runs[lean] = [lm(input_ids=x).logits]  # no <recall> in the input: PEFT leaves the adapter off
            for offsets in ([0, 0, 0], [1, 3, 7], [7, 7, 7], [0, 2, 9]):
                with adapter_active(lm, offsets):
                    runs[lean].append(lm.get_base_model()(input_ids=x).logits)
    for plain, lean in zip(runs[False], runs[True]):
        assert torch.allclose(plain, lean, atol=1e-5)
    assert not torch.allclose(runs[True][0], runs[True][2])  # the offsets do switch the adapter on


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lean_training_forward_has_pefts_loss_and_gradients(tokenizer, dropout):
    """In training the lean path takes inputs activated everywhere or nowhere (the trainers'
    tail and context passes); the loss and every LoRA gradient equal PEFT's masked path, with
    dropout drawn from the same seed. A deep copy of the model runs on its own weights."""
    from recall.activation import use_fast_forward

    model, tok, ids = _recall_model(tokenizer, "recall", lora_dropout=dropout)
    _randomise_lora(model)
    lm = model.lm.train()
    x = torch.randint(100, 40000, (2, 6))
    grads = {}
    for lean in (False, True):
        _pefts_forward(lm)
        if lean:
            use_fast_forward(lm)
        lm.zero_grad()
        torch.manual_seed(11)
        with adapter_active(lm, [0, 0]):
            nowhere = lm.get_base_model()(input_ids=x).logits
        with adapter_active(lm, [6, 9]):
            everywhere = lm.get_base_model()(input_ids=x).logits
        (nowhere.square().mean() + everywhere.square().mean()).backward()
        grads[lean] = {n: p.grad.clone() for n, p in lm.named_parameters() if "lora_" in n}
        grads[lean]["_logits"] = everywhere.detach()
    assert grads[False].keys() == grads[True].keys() and len(grads[True]) > 1
    for name in grads[False]:
        assert torch.allclose(grads[False][name], grads[True][name], atol=1e-5), name
    assert any(g.abs().sum() > 0 for n, g in grads[True].items() if "lora_A" in n)
    twin = copy.deepcopy(lm)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "lora_B" in n:
                p.zero_()
    twin.eval(), lm.eval()
    with torch.no_grad():
        def logits(m, offsets):
            with adapter_active(m, offsets):
                return m.get_base_model()(input_ids=x).logits
        assert torch.allclose(logits(twin, [6, 6]), logits(twin, [0, 0]), atol=1e-6)  # the copy's zero LoRA
        assert not torch.allclose(logits(lm, [6, 6]), logits(lm, [0, 0]), atol=1e-3)


@pytest.mark.parametrize("scope", ["all", "recall"])
def test_step2_index_plan_gives_the_losses_and_gradients_of_masked_positions(tokenizer, tmp_path, scope):
    """The collator's host-side ``index_plan`` (no host sync in the forward on a GPU) selects
    what boolean masks over the batch select: the hidden states (pads found by ``nonzero``, the
    activated passes' widths by ``max``) and every loss part (LM, KD, recall, preserve) equal a
    reference written with masks, and so do the gradients; for the adapter at every position
    and the activated one."""
    import torch.nn.functional as F

    from recall.text_memory_train import IGNORE, DecodingCollator

    model, tok, ids, bank, args, base = _activated_decoder(tokenizer, tmp_path, adapter_scope=scope)
    _randomise_lora(model)
    model.loss_weights.update(recall=0.5, preserve=2.0, kd=1.0)
    sft = [SFTExample("Say hi.", "Hi there!"), SFTExample("Name a colour.", "Blue.")]
    builder = SampleBuilder(tok, FACTS, [["Tell me.", "Where?"]] * 3, sft, max_length=128, mix="2:1:1")
    kd = builder.teacher_topk(base, k=8)
    anchors = F.normalize(torch.randn(16, 64), dim=-1)
    samples = [builder.memory_sample(0, 0), builder.sandwich_sample(1, 1), builder.memory_sample(2, 1),
               builder.sft_sample(0)]
    batch = DecodingCollator(tok.pad_token_id, bank, model.pad_id, anchors=anchors, kd=kd,
                             recall_id=model.recall_id)(samples)
    plan = batch["plan"]
    assert plan["kd_select"].numel() and plan["recall_rows"].numel() and plan["preserve_rows"].numel()
    assert plan["pad_index"].numel() == batch["memory_vectors"].shape[0] == 3
    model.eval()  # no injection noise

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    out = model(**batch)
    out["loss"].backward()
    planned = grads()

    ids_, labels = batch["input_ids"], batch["labels"]
    hidden = model.hidden_states(ids_, batch["attention_mask"], batch["memory_vectors"])  # no plan
    real = batch["attention_mask"].bool()  # padded positions are never read (no mask with a plan: causal only)
    assert plan["right_padded"]
    with torch.no_grad():
        assert torch.allclose(model.hidden_states(ids_, batch["attention_mask"], batch["memory_vectors"], plan)[real],
                              hidden[real], atol=1e-5)
    picked = labels[:, 1:] != IGNORE
    log_probs = torch.log_softmax(model.logits(hidden[:, :-1][picked]), -1)
    ref = {"lm": F.nll_loss(log_probs, labels[:, 1:][picked])}
    on = batch["kd_mask"][:, 1:][picked]
    teacher = batch["kd_logprobs"][:, 1:][picked][on]
    teacher = teacher - torch.logsumexp(teacher, -1, keepdim=True)
    student = log_probs[on].gather(-1, batch["kd_indices"][:, 1:][picked][on])
    ref["kd"] = (teacher.exp() * (teacher - student)).sum(-1).mean()
    first = (ids_ == model.recall_id).int().argmax(1)
    rows = batch["recall_targets"] >= 0
    query = F.normalize(hidden[rows, first[rows]], dim=-1)
    ref["recall"] = F.cross_entropy(query @ bank.T * model.recall_scale, batch["recall_targets"][rows])
    rows = (ids_ == model.recall_id).any(1) & (batch["recall_anchors"].abs().sum(-1) > 0)
    query = F.normalize(hidden[rows, first[rows]], dim=-1)
    ref["preserve"] = (1 - (query * F.normalize(batch["recall_anchors"][rows], dim=-1)).sum(-1)).mean()
    for key, value in ref.items():
        assert torch.allclose(out[key], value.detach(), atol=1e-5), key
    sum(model.loss_weights[k] * v for k, v in ref.items()).backward()
    masked = grads()
    assert planned.keys() == masked.keys() and planned
    for name in planned:
        assert torch.allclose(planned[name], masked[name], atol=1e-5), name


def test_step2_context_cache_gives_the_uncached_losses_and_gradients(tokenizer, tmp_path):
    """Step 2 with the activated adapter keeps each context's base-model KV cache and final
    states (``context_cache_mb``): a batch served from the cache, in another order and padding,
    gives the losses and gradients of the uncached two passes."""
    from recall.text_memory_train import DecodingCollator

    model, tok, ids, bank, args, base = _activated_decoder(tokenizer, tmp_path)
    assert model.context_cache is not None  # on by default for the activated adapter
    _randomise_lora(model)
    model.loss_weights.update(preserve=2.0)
    builder = SampleBuilder(tok, FACTS, [["Tell me.", "Where do I live again?"]] * 3,
                            [SFTExample("Say hi.", "Hi there!")], max_length=128, mix="2:1:0")
    samples = [builder.memory_sample(0, 0), builder.sandwich_sample(1, 0), builder.memory_sample(2, 1)]
    anchors = torch.nn.functional.normalize(torch.randn(16, 64), dim=-1)
    collate = DecodingCollator(tok.pad_token_id, bank, model.pad_id, anchors=anchors, recall_id=model.recall_id)
    model.eval()  # no injection noise

    def run(batch):
        out = model(**batch)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out, grads

    cache = model.context_cache
    model.context_cache = None
    reference = run(collate(samples))
    model.context_cache = cache
    run(collate(samples))  # fills the cache
    assert cache.misses == 3 and len(cache.entries) == 3
    again = run(collate([samples[2], samples[0], samples[1]]))  # every context from the cache
    assert cache.hits == 3
    order = [2, 0, 1]
    for key in ("loss", "lm", "preserve"):
        assert torch.allclose(reference[0][key], again[0][key], atol=1e-5), key
    assert reference[1].keys() == again[1].keys() and reference[1]
    for name in reference[1]:
        assert torch.allclose(reference[1][name], again[1][name], rtol=1e-4, atol=1e-5), name
    with torch.no_grad():  # and the states, row by row
        a = collate(samples)
        b = collate([samples[i] for i in order])
        model.context_cache = None
        ha = model.hidden_states(a["input_ids"], a["attention_mask"], a["memory_vectors"], a["plan"])
        model.context_cache = cache
        hb = model.hidden_states(b["input_ids"], b["attention_mask"], b["memory_vectors"], b["plan"])
        for j, i in enumerate(order):
            n = len(samples[i]["input_ids"])
            assert torch.allclose(ha[i, :n], hb[j, :n], atol=1e-5)


def test_step2_anchors_are_the_models_own_recall_states_and_fill_the_context_cache(tokenizer, tmp_path):
    """Step 2's preserve targets come from the decoder model itself before training
    (``MemoryDecoderModel.recall_states``), through the forward pass training runs: the
    preserve term starts at zero on every kind of sample, the anchors equal the served
    step-1 queries of the same texts, and each context's base pass is cached for epoch 1."""
    from recall.text_memory_train import DecodingCollator

    model, tok, ids, bank, args, base = _activated_decoder(tokenizer, tmp_path)
    _randomise_lora(model)  # step 1's adapter
    model.eval()
    texts = ["Tell me.", "Where do I live again?"]
    builder = SampleBuilder(tok, FACTS, [texts] * 3, [SFTExample("Say hi.", "Hi there!")], max_length=128,
                            mix="1:1:0")
    contexts = builder.anchor_contexts()
    assert len(contexts) == 3 * 2 + 1
    anchors = model.recall_states(contexts)
    cache = model.context_cache
    assert cache.misses == 3 and len(cache.entries) == 3  # two distinct memory contexts and one sandwich's
    queries = torch.from_numpy(RecallEngine(model.lm, tok, ids).query_vectors(texts))
    assert torch.allclose(torch.nn.functional.cosine_similarity(anchors[:2], queries, dim=-1),
                          torch.ones(2), atol=1e-5)
    collate = DecodingCollator(tok.pad_token_id, bank, model.pad_id, anchors=anchors, recall_id=model.recall_id)
    samples = [builder.memory_sample(0, 0), builder.memory_sample(2, 1), builder.sandwich_sample(1, 0)]
    hits = cache.hits
    with torch.no_grad():
        parts = model(**collate(samples))
    assert cache.hits == hits + 3 and cache.misses == 3  # every context from the cache
    assert parts["preserve"] < 1e-6
    wrong = DecodingCollator(tok.pad_token_id, bank, model.pad_id, anchors=anchors.roll(1, 0),
                             recall_id=model.recall_id)
    with torch.no_grad():
        assert model(**wrong(samples))["preserve"] > 1e-3  # the term can tell
