"""The recall loop: generation that retrieves and reads memories when the model asks.

``RecallEngine`` wraps a plain causal LM (a published version, or the merged model at the
end of training) with the memory projector and runs a batched greedy decoding loop on
the KV cache:

1. each step feeds one input per row: a token embedding, or a memory vector;
2. when a row's fed token is ``<recall>``, that position's final hidden state is the query;
   the rows that asked in this step are searched together (``search`` callback);
3. a hit above ``threshold`` is injected at a forced ``<|memory_pad|>``, and the model
   decodes the memory's text up to ``</recall>`` and goes on answering; below the
   threshold the row is told ``NOT_FOUND`` and ``</recall>`` is forced;
4. a row may recall several times (up to ``max_recalls``) and stops at end-of-turn.

``force_recall`` starts every answer with the activation phrase and ``<recall>``.

With an activated adapter (``recall.activation``: a PEFT model whose LoRA acts from
``<recall>`` on), each row's adapter switches on at the step that feeds its ``<recall>``
and stays on; before that the row runs the base model, and so does its KV cache.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from memory.token_manager import safe_chat_template
from recall.activation import adapter_active, is_activated, use_fast_forward
from recall.get_text_embedding import autocast, backbone

NOT_FOUND = " (nothing found in memory)"
NEUTRAL_CONTEXT = "What do you remember about me?"


@dataclasses.dataclass
class Hit:
    memory_id: int
    score: float
    text: str
    vector: np.ndarray


@dataclasses.dataclass
class Recall:
    query_position: int
    memory_id: Optional[int]
    score: Optional[float]
    stored_text: Optional[str]
    decoded: str = ""


@dataclasses.dataclass
class Answer:
    prompt: str
    text: str  # the whole generated answer, memory spans included
    recalls: List[Recall]
    final: str  # the answer without the recall spans

    def asked(self) -> bool:
        return bool(self.recalls)


SearchFn = Callable[[np.ndarray], List[List[Hit]]]


class _Row:
    def __init__(self):
        self.generated: List[int] = []
        self.queue: List = []  # forced inputs: int token ids or ("vec", tensor)
        self.recalls: List[Recall] = []
        self.in_memory = False  # between <|memory_pad|> and </recall>
        self.done = False
        self.forced = False  # the prompt ended in <recall> (--force-recall): generation starts inside a recall
        self.active = False  # an activated adapter acts on this row (it has fed <recall>)


class RecallEngine:
    def __init__(self, lm, tokenizer, token_ids: Dict[str, int], projector=None, query_projector=None,
                 activation_phrase: str = "Let me check my memory.", autocast_dtype=None):
        from memory.token_manager import MEMORY_PAD_TOKEN, RECALL_END_TOKEN, RECALL_TOKEN

        self.lm, self.tokenizer = lm, tokenizer
        self.recall_id = token_ids[RECALL_TOKEN]
        self.end_id = token_ids[RECALL_END_TOKEN]
        self.pad_id = token_ids[MEMORY_PAD_TOKEN]
        self.projector, self.query_projector = projector, query_projector
        self.activation_phrase = activation_phrase
        self.autocast_dtype = autocast_dtype
        self.device = next(lm.parameters()).device
        self.activated = is_activated(lm)
        if self.activated:
            use_fast_forward(lm)  # idempotent: a model fresh from training has it already
        stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
        self.stop_ids = {s for s in stops if isinstance(s, int) and s >= 0}
        self.filler = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ----------------------------------------------------------- prompts
    def prompt_text(self, user_text: str, history: Sequence[dict] = (), force_recall: bool = False) -> str:
        messages = [{"role": "system", "content": ""}, *history, {"role": "user", "content": user_text}]
        text = safe_chat_template(self.tokenizer, messages, add_generation_prompt=True)
        if force_recall:
            text += f"{self.activation_phrase} {self.tokenizer.convert_ids_to_tokens(self.recall_id)}"
        return text

    # ----------------------------------------------------------- model steps
    def _embed(self, ids: torch.Tensor, vectors: Dict[int, torch.Tensor]) -> torch.Tensor:
        emb = self.lm.get_input_embeddings()(ids)
        for row, vec in vectors.items():
            if self.projector is None:
                raise ValueError("this model has no memory projector: it cannot read memory vectors")
            emb[row, -1] = self.projector(vec.to(self.device)[None])[0].to(emb.dtype)
        return emb

    def _forward(self, emb, attention_mask, past, active: Optional[Sequence[int]] = None):
        """One step; ``active[b]``: how many of row ``b``'s last fed positions an activated
        adapter acts on (ignored for a plain model)."""
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -emb.shape[1]:]
        gate = contextlib.nullcontext()
        if self.activated:
            gate = adapter_active(self.lm, active if active is not None else [0] * emb.shape[0])
        with gate, autocast(self.device, self.autocast_dtype):
            out = backbone(self.lm)(inputs_embeds=emb, attention_mask=attention_mask, position_ids=positions,
                                    cache=past, use_cache=True)
        hidden = out.last_hidden_state
        logits = self.lm.get_output_embeddings()(hidden[:, -1]).float()
        return hidden, logits, out.cache

    def _query(self, hidden: torch.Tensor) -> torch.Tensor:
        q = hidden.float()
        if self.query_projector is not None:
            q = self.query_projector(q)
        return F.normalize(q, dim=-1)

    @torch.no_grad()
    def query_vectors(self, contexts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """The ``<recall>`` query for each context (step 1's ``format_query`` shape)."""
        from recall.text_embedding_train import format_query

        out = []
        for start in range(0, len(contexts), batch_size):
            texts = [format_query(self.tokenizer, c, self.activation_phrase) for c in contexts[start:start + batch_size]]
            enc = self.tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left",
                                 return_tensors="pt").to(self.device)
            hidden = self._forward(self.lm.get_input_embeddings()(enc["input_ids"]), enc["attention_mask"], None,
                                   [1] * len(texts))[0][:, -1]
            out.append(self._query(hidden).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    # ----------------------------------------------------------- decoding
    @torch.no_grad()
    def decode_memories(self, vectors: np.ndarray, context: str = NEUTRAL_CONTEXT, max_new_tokens: int = 48,
                        batch_size: int = 16) -> List[str]:
        """Greedy text decoded from each memory vector, injected after ``context``'s ``<recall>``."""
        texts: List[str] = []
        for start in range(0, len(vectors), batch_size):
            chunk = vectors[start:start + batch_size]
            hits = [[Hit(-1, 1.0, "", v)] for v in chunk]
            prompts = [self.prompt_text(context, force_recall=True)] * len(chunk)
            answers = self.generate_prompts(prompts, search=lambda q, h=hits: h[: len(q)], max_new_tokens=max_new_tokens,
                                            stop_after_recall=True, max_recalls=1, threshold=-1.0)
            texts += [a.recalls[0].decoded if a.recalls else "" for a in answers]
        return texts

    @torch.no_grad()
    def generate(self, user_texts: Sequence[str], search: SearchFn, *, force_recall: bool = False,
                 history: Sequence[dict] = (), **kwargs) -> List[Answer]:
        prompts = [self.prompt_text(t, history, force_recall) for t in user_texts]
        return self.generate_prompts(prompts, search, **kwargs)

    @torch.no_grad()
    def generate_prompts(self, prompts: Sequence[str], search: SearchFn, *, max_new_tokens: int = 96,
                         threshold: float = 0.0, max_recalls: int = 2, stop_after_recall: bool = False
                         ) -> List[Answer]:
        """Batched greedy decoding with the recall loop (see the module docstring)."""
        tok = self.tokenizer
        enc = tok(list(prompts), add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        rows = [_Row() for _ in prompts]
        not_found = tok(NOT_FOUND, add_special_tokens=False)["input_ids"] + [self.end_id]
        fed = ids[:, -1].tolist()
        for row, last in zip(rows, fed):
            row.forced = row.active = last == self.recall_id
        hidden, logits, past = self._forward(self._embed(ids, {}), mask, None, [int(r.active) for r in rows])
        for _ in range(max_new_tokens + 1):
            self._handle_queries(rows, fed, hidden[:, -1], search, threshold, not_found, mask.shape[1] - 1)
            next_ids, vectors = [], {}
            for b, row in enumerate(rows):
                choice = self._next_input(row, logits[b], max_recalls, stop_after_recall)
                if isinstance(choice, tuple):
                    vectors[b] = choice[1]
                    choice = self.pad_id
                next_ids.append(choice)
            if all(r.done for r in rows):
                break
            step = torch.tensor(next_ids, device=self.device)[:, None]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            for row, token in zip(rows, next_ids):
                row.active = row.active or token == self.recall_id
            hidden, logits, past = self._forward(self._embed(step, vectors), mask, past, [int(r.active) for r in rows])
            fed = next_ids
        return [self._answer(p, r) for p, r in zip(prompts, rows)]

    def _handle_queries(self, rows, fed, last_hidden, search, threshold, not_found, position):
        asking = [b for b, t in enumerate(fed) if t == self.recall_id and not rows[b].done]
        if not asking:
            return
        queries = self._query(last_hidden[asking]).cpu().numpy()
        results = search(queries)
        for b, hits in zip(asking, results):
            row = rows[b]
            best = hits[0] if hits else None
            if best is not None and best.score >= threshold:
                row.recalls.append(Recall(position, best.memory_id, best.score, best.text))
                row.queue.append(("vec", torch.as_tensor(np.asarray(best.vector, np.float32))))
                row.in_memory = True
            else:
                row.recalls.append(Recall(position, None, best.score if best else None, None, NOT_FOUND.strip()))
                row.queue.extend(not_found)

    def _next_input(self, row: _Row, logits: torch.Tensor, max_recalls: int, stop_after_recall: bool):
        if row.done:
            return self.filler
        if row.queue:
            choice = row.queue.pop(0)
            if not isinstance(choice, tuple):
                row.generated.append(choice)
            else:
                row.generated.append(self.pad_id)
            return choice
        logits = logits.clone()
        logits[self.pad_id] = float("-inf")  # the pad is only ever forced
        if len(row.recalls) >= max_recalls:
            logits[self.recall_id] = float("-inf")  # no more recalls for this answer
        choice = int(logits.argmax())
        row.generated.append(choice)
        if row.in_memory and choice != self.end_id:
            row.recalls[-1].decoded += self.tokenizer.decode([choice])
        if choice == self.end_id:
            row.in_memory = False
            if stop_after_recall:
                row.done = True
        if choice in self.stop_ids:
            row.done = True
        return choice

    def _answer(self, prompt: str, row: _Row) -> Answer:
        text = self.tokenizer.decode(row.generated, skip_special_tokens=False)
        final_ids, skipping = [], row.forced
        for t in row.generated:
            if t == self.recall_id:
                skipping = True
            elif t == self.end_id:
                skipping = False
            elif not skipping and t not in self.stop_ids:
                final_ids.append(t)
        for r in row.recalls:
            r.decoded = r.decoded.strip()
        final = self.tokenizer.decode(final_ids, skip_special_tokens=True).strip()
        final = final.replace(self.activation_phrase, "").strip()
        return Answer(prompt, text, row.recalls, final)
