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
4. with ``memories_per_recall`` k > 1, the next hits above the threshold (up to k in all)
   follow the first memory's ``</recall>``, each in its own span: ``<recall>``, its vector
   at ``<|memory_pad|>``, its text, ``</recall>``, with no new search. Their text is decoded
   in a side pass from the same context as the first memory (the prompt up to this
   ``<recall>``), as step 2 trained every memory to be read, and then forced into the
   answer: decoded in place, after the first memory's text, the model tended to repeat
   that text instead of reading the next vector (it never saw two spans in a row in
   training). The answer then continues with all k memories in its context;
5. a row may ask several times (up to ``max_recalls`` asks) and stops at end-of-turn;
6. ``no_repeat_ngram`` n > 0: outside recall spans, a token that would repeat an n-gram of the
   answer text is never chosen (``transformers``' ``no_repeat_ngram_size``, for the answer alone).
   Greedy decoding of a 135M model otherwise loops ("She lives in Madrid. She lives in Madrid.
   ...") until the token limit. ``chat.py`` and ``evaluate.py`` use ``NO_REPEAT_NGRAM``.

Three ways to recall (``generate(recall=...)``; ``RECALL_MODES``):

- ``"auto"`` (the default, what ``chat.py`` answers with): every user turn is *probed*: the
  ``<recall>`` query after the turn and the activation phrase is computed and searched
  (``probe``). When the best memory reaches ``threshold`` (the version's calibrated level:
  step 1's learned "no memory" class puts general prompts below it), the answer is generated
  after that recall, as with ``"force"``; otherwise the turn is answered by the model alone,
  with no recall span and ``<recall>`` never chosen: ordinary chat, exactly the base model
  with an activated adapter;
- ``"force"``: every answer starts with the activation phrase and ``<recall>``;
- ``"model"``: the model has to emit ``<recall>`` by itself.

**Verified spans** (``verify``, default on): a recall span shows exactly one stored memory.
While the model decodes an injected memory, each greedy token is checked against the stored
text's tokens (the tokenisation step 2 trains on); at the first token that differs, the
stored token is forced instead and the span is marked ``verified=False`` with the model's
token kept for the trace (``Recall.diverged_at``, ``Recall.model_token``). So a span never
shows a detail that is in no memory, it ends at the memory's end with ``</recall>``, and the
answer goes on from the true memory. ``decode_memories`` (what ``decode_exact_match``
measures) decodes without this check.

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

from memory.token_manager import safe_chat_template, stop_ids
from recall.activation import adapter_active, is_activated, use_fast_forward
from recall.get_text_embedding import autocast, backbone, encode_by_length

NOT_FOUND = " (nothing found in memory)"
NO_REPEAT_NGRAM = 0  # chat.py's and evaluate.py's default: plain greedy decoding (see the module docstring)
NEUTRAL_CONTEXT = "What do you remember about me?"
RECALL_MODES = ("auto", "force", "model")


@dataclasses.dataclass(frozen=True)
class ChatDefaults:
    """What ``chat.py`` answers with unless told otherwise; ``evaluate.py``'s "chat" figures
    use the same, so they measure what a user of ``chat.py`` reads."""

    recall: str = "auto"
    top_k: int = 3  # memories searched per <recall>
    max_new_tokens: int = 128
    no_repeat_ngram: int = NO_REPEAT_NGRAM
    verify: bool = True  # recall spans checked against the stored memory (see the module docstring)
    retrieval: str = "fused"  # memory.search: "recall" (<recall> alone) | "fused" (<recall> + MiniLM ranking)


CHAT_DEFAULTS = ChatDefaults()


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
    decoded: str = ""  # the span's text as shown (with ``verify``: the stored text, always)
    rank: int = 1  # the hit's rank in its search: > 1 for a follow-on memory (``memories_per_recall``)
    # with ``verify``: True when the model decoded the stored text itself; False when it diverged
    # and the stored text was forced from token ``diverged_at`` on (``model_token``: its choice there)
    verified: Optional[bool] = None
    diverged_at: Optional[int] = None
    model_token: Optional[str] = None


@dataclasses.dataclass
class Answer:
    prompt: str
    text: str  # the whole generated answer, memory spans included
    recalls: List[Recall]
    final: str  # the answer without the recall spans
    tokens: List[int] = dataclasses.field(default_factory=list)  # every generated (or forced) token id
    # recall auto/force: the probe's best-scoring memory (its score decided; it is kept even when below
    # the threshold)
    probe: Optional[Hit] = None
    context_tokens: int = 0  # tokens the model had read when its answer text began (prompt and recall spans)

    def asked(self) -> bool:
        return bool(self.recalls)

    def recalled(self) -> bool:
        """A recall span showed a memory."""
        return any(r.memory_id is not None for r in self.recalls)


SearchFn = Callable[[np.ndarray], List[List[Hit]]]


def passes(hits: Sequence[Hit], threshold: float) -> bool:
    """Whether a search's hits recall anything: the best ``score`` (the ``<recall>`` cosine)
    reaches the threshold. The first hit is the one injected; a search may order its hits by
    something else (``memory.search.FusedSearch``), which decides *which* memory, not *whether*."""
    return bool(hits) and max(h.score for h in hits) >= threshold


def recall_spans(text: str) -> List[str]:
    """The memory spans in a generated text (special tokens kept): what follows each
    ``<|memory_pad|>`` up to its ``</recall>`` (or the end), whitespace-stripped. Read from the
    text itself, not from the engine's bookkeeping, so a check built on it sees what a user sees."""
    from memory.token_manager import MEMORY_PAD_TOKEN, RECALL_END_TOKEN

    return [part.split(RECALL_END_TOKEN, 1)[0].strip() for part in text.split(MEMORY_PAD_TOKEN)[1:]]


class _Row:
    def __init__(self):
        self.generated: List[int] = []
        self.queue: List = []  # forced inputs: int token ids or ("vec", tensor)
        self.recalls: List[Recall] = []
        self.asks = 0  # searches made (follow-on memories are not asks)
        self.pending: List[tuple] = []  # (hit, decoded token ids, query position) of the search's further hits
        self.quiet_recalls = 0  # forced follow-on <recall> tokens in the queue: no search for them
        self.answer: List[int] = []  # the tokens the model chose outside recall spans
        self.in_memory = False  # between <|memory_pad|> and </recall>
        self.done = False
        self.forced = False  # the prompt ended in <recall> (--force-recall): generation starts inside a recall
        self.active = False  # an activated adapter acts on this row (it has fed <recall>)
        self.expect: Optional[List[int]] = None  # verify: the rest of the injected memory's tokens, then </recall>
        self.span_at = 0  # verify: tokens of the current span decoded so far
        self.context_tokens = 0  # tokens fed before the first token of the answer text


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
        self.stop_ids = set(stop_ids(tokenizer))
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
        """The ``<recall>`` query for each context (step 1's ``format_query`` shape); each
        distinct context once, batched by length (``encode_by_length``)."""
        from recall.text_embedding_train import format_query

        return self.prompt_queries([format_query(self.tokenizer, c, self.activation_phrase) for c in contexts],
                                   batch_size)

    @torch.no_grad()
    def prompt_queries(self, prompts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """The query at the last token of each prompt (a text ending in ``<recall>``), batched
        by length."""
        def encode(batch: List[str]) -> torch.Tensor:
            enc = self.tokenizer(batch, add_special_tokens=False, padding=True, padding_side="left",
                                 return_tensors="pt").to(self.device)
            hidden = self._forward(self.lm.get_input_embeddings()(enc["input_ids"]), enc["attention_mask"], None,
                                   [1] * len(batch))[0][:, -1]
            return self._query(hidden).float().cpu()

        if not len(prompts):
            return np.zeros((0, 0), np.float32)
        return encode_by_length(list(prompts), encode, batch_size).numpy()

    def probe(self, user_texts: Sequence[str], search: SearchFn, history: Sequence[dict] = ()
              ) -> List[List[Hit]]:
        """Recall "auto"'s first half: the search results of the ``<recall>`` query after each
        user turn (with ``history`` before it) and the activation phrase, best first."""
        prompts = [self.prompt_text(t, history, force_recall=True) for t in user_texts]
        if not prompts:
            return []
        queries = self.prompt_queries(prompts)
        # a search that also ranks by the turn's text (``reads_texts``, e.g. a fused ranking) gets it
        return search(queries, list(user_texts)) if getattr(search, "reads_texts", False) else search(queries)

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
                                            stop_after_recall=True, max_recalls=1, threshold=-1.0, verify=False)
            texts += [a.recalls[0].decoded if a.recalls else "" for a in answers]
        return texts

    @torch.no_grad()
    def generate(self, user_texts: Sequence[str], search: SearchFn, *, recall: str = "auto",
                 force_recall: Optional[bool] = None, history: Sequence[dict] = (), threshold: float = 0.0,
                 **kwargs) -> List[Answer]:
        """Answers to ``user_texts`` (each after ``history``) with ``recall`` one of
        ``RECALL_MODES`` (see the module docstring); ``force_recall``, when given, is the older
        spelling of ``recall="force"`` (True) or ``"model"`` (False)."""
        if force_recall is not None:
            recall = "force" if force_recall else "model"
        if recall not in RECALL_MODES:
            raise ValueError(f"recall: expected one of {RECALL_MODES}, got {recall!r}")
        if recall == "model":
            prompts = [self.prompt_text(t, history) for t in user_texts]
            return self.generate_prompts(prompts, search, threshold=threshold, **kwargs)
        results = self.probe(user_texts, search, history)
        if recall == "auto":
            found = [i for i, hits in enumerate(results) if passes(hits, threshold)]
        else:  # force: every turn recalls; below the threshold the span says nothing was found
            found = list(range(len(user_texts)))
        chosen = set(found)
        rest = [i for i in range(len(user_texts)) if i not in chosen]
        answers: List[Optional[Answer]] = [None] * len(user_texts)
        if found:  # answered after the probe's recall: its hits, with no second search
            replay = [results[i] for i in found]

            def replayed(queries):
                if len(queries) != len(replay):
                    raise RuntimeError("recall: the probe's rows and the recalling rows disagree")
                return replay

            prompts = [self.prompt_text(user_texts[i], history, force_recall=True) for i in found]
            kwargs_found = {**kwargs, "max_recalls": 1}
            for i, a in zip(found, self.generate_prompts(prompts, replayed, threshold=threshold, **kwargs_found)):
                answers[i] = a
        if rest:  # nothing to recall: the model alone, which may not ask either
            prompts = [self.prompt_text(user_texts[i], history) for i in rest]
            for i, a in zip(rest, self.generate_prompts(prompts, search, threshold=threshold,
                                                        **{**kwargs, "max_recalls": 0})):
                answers[i] = a
        for i, a in enumerate(answers):  # the hit whose <recall> score decided
            a.probe = max(results[i], key=lambda h: h.score) if results[i] else None
        return answers  # type: ignore[return-value]

    @torch.no_grad()
    def generate_prompts(self, prompts: Sequence[str], search: SearchFn, *, max_new_tokens: int = 96,
                         threshold: float = 0.0, max_recalls: int = 2, stop_after_recall: bool = False,
                         memories_per_recall: int = 1, no_repeat_ngram: int = 0, verify: bool = True
                         ) -> List[Answer]:
        """Batched greedy decoding with the recall loop (see the module docstring)."""
        if memories_per_recall < 1:
            raise ValueError(f"memories_per_recall must be >= 1, got {memories_per_recall}")
        tok = self.tokenizer
        enc = tok(list(prompts), add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        rows = [_Row() for _ in prompts]
        not_found = tok(NOT_FOUND, add_special_tokens=False)["input_ids"] + [self.end_id]
        fed = ids[:, -1].tolist()
        for row, last, n in zip(rows, fed, mask.sum(1).tolist()):
            row.forced = row.active = last == self.recall_id
            row.context_tokens = int(n)
        hidden, logits, past = self._forward(self._embed(ids, {}), mask, None, [int(r.active) for r in rows])
        for _ in range(max_new_tokens + 1):
            self._handle_queries(rows, fed, hidden[:, -1], search, threshold, not_found, mask.shape[1] - 1,
                                 memories_per_recall, prompts, verify)
            next_ids, vectors = [], {}
            for b, row in enumerate(rows):
                choice = self._next_input(row, logits[b], max_recalls, stop_after_recall, no_repeat_ngram)
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

    @staticmethod
    def _vec(hit: Hit):
        return ("vec", torch.as_tensor(np.asarray(hit.vector, np.float32)))

    def decode_follow_ons(self, contexts: Sequence[str], hits: Sequence[Hit], max_new_tokens: int = 48
                          ) -> List[List[int]]:
        """The token ids each hit's vector decodes to, injected after its context (a prompt
        ending in ``<recall>``), up to ``</recall>`` (excluded): one batched side pass."""
        if not hits:
            return []
        by_row = [[h] for h in hits]
        answers = self.generate_prompts(list(contexts), search=lambda q: by_row[: len(q)], max_new_tokens=max_new_tokens,
                                        stop_after_recall=True, max_recalls=1, threshold=float("-inf"), verify=False)
        out = []
        for a in answers:  # the span's own ids: from after the injected pad up to </recall> or a stop
            ids = a.tokens[a.tokens.index(self.pad_id) + 1:] if self.pad_id in a.tokens else []
            cut = next((i for i, t in enumerate(ids) if t == self.end_id or t in self.stop_ids), len(ids))
            out.append(ids[:cut])
        return out

    def memory_ids(self, text: str) -> List[int]:
        """A stored memory's token ids as a span decodes them (step 2 trains on exactly these)."""
        from memory.token_manager import neutralize

        return self.tokenizer(neutralize(text, self.tokenizer), add_special_tokens=False)["input_ids"]

    def _handle_queries(self, rows, fed, last_hidden, search, threshold, not_found, position,
                        memories_per_recall: int = 1, prompts: Sequence[str] = (), verify: bool = False):
        asking = []
        for b, t in enumerate(fed):
            row = rows[b]
            if t != self.recall_id or row.done:
                continue
            if row.quiet_recalls:  # a forced follow-on <recall>: its span is already queued
                row.quiet_recalls -= 1
            else:
                asking.append(b)
        if not asking:
            return
        queries = self._query(last_hidden[asking]).cpu().numpy()
        results = search(queries)
        follow: List[tuple] = []  # (row, hit, context) for the side pass
        for b, hits in zip(asking, results):
            row = rows[b]
            row.asks += 1
            best = hits[0] if hits else None
            if passes(hits, threshold):
                row.recalls.append(Recall(position, best.memory_id, best.score, best.text,
                                          verified=True if verify else None))
                row.queue.append(self._vec(best))
                row.in_memory = True
                row.expect = self.memory_ids(best.text) + [self.end_id] if verify else None
                row.span_at = 0
                extra = [h for h in hits[1:memories_per_recall] if h.score >= threshold]
                if extra:  # the context of this <recall>: the prompt and what the row generated so far
                    context = prompts[b] + self.tokenizer.decode(row.generated, skip_special_tokens=False) \
                        if row.generated else prompts[b]
                    follow += [(row, h, context) for h in extra]
            else:
                top = max((h.score for h in hits), default=None)
                row.recalls.append(Recall(position, None, top, None, NOT_FOUND.strip()))
                row.queue.extend(not_found)
        if follow:
            decoded = self.decode_follow_ons([c for _, _, c in follow], [h for _, h, _ in follow])
            for (row, hit, _), ids in zip(follow, decoded):
                row.pending.append((hit, ids, position, verify))

    @staticmethod
    def _repeats(tokens: List[int], n: int) -> List[int]:
        """Tokens that would complete an n-gram already in ``tokens``."""
        if n <= 0 or len(tokens) < n:
            return []
        tail = tokens[len(tokens) - n + 1:]
        return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i:i + n - 1] == tail]

    def _next_input(self, row: _Row, logits: torch.Tensor, max_recalls: int, stop_after_recall: bool,
                    no_repeat_ngram: int = 0):
        if row.done:
            return self.filler
        if row.queue:
            choice = row.queue.pop(0)
            if not isinstance(choice, tuple):
                row.generated.append(choice)
            else:
                row.generated.append(self.pad_id)
            if stop_after_recall and choice == self.end_id and not row.queue:
                row.done = True  # a forced span (follow-on memory, or "nothing found") closed the recall
            return choice
        logits = logits.clone()
        logits[self.pad_id] = float("-inf")  # the pad is only ever forced
        if row.asks >= max_recalls:
            logits[self.recall_id] = float("-inf")  # no more recalls for this answer
        if not row.in_memory:
            for t in self._repeats(row.answer, no_repeat_ngram):
                logits[t] = float("-inf")
        choice = int(logits.argmax())
        if row.in_memory and row.expect is not None:
            choice = self._verified(row, choice)
        row.generated.append(choice)
        if not row.in_memory and choice not in (self.recall_id, self.end_id):
            if not row.answer:  # the answer text begins: what the model has read so far is its context
                row.context_tokens += len(row.generated) - 1
            row.answer.append(choice)
        if row.in_memory and choice != self.end_id:
            row.recalls[-1].decoded += self.tokenizer.decode([choice])
        if choice == self.end_id:
            row.in_memory = False
            row.expect = None
            for hit, ids, position, verify in row.pending:  # the search's further hits, each in its own span
                rank = row.recalls[-1].rank + 1
                recall = Recall(position, hit.memory_id, hit.score, hit.text, rank=rank)
                if verify:  # the side pass's decode, checked against the stored text like a first memory
                    ids = self._verified_ids(recall, ids, self.memory_ids(hit.text))
                recall.decoded = self.tokenizer.decode(ids)
                row.recalls.append(recall)
                row.queue += [self.recall_id, self._vec(hit), *ids, self.end_id]
                row.quiet_recalls += 1
            row.pending = []
            if stop_after_recall and not row.queue:
                row.done = True
        if choice in self.stop_ids:
            row.done = True
        return choice

    def _verified(self, row: _Row, choice: int) -> int:
        """The next span token under ``verify``: the model's ``choice`` when it is the stored
        text's next token (or ``</recall>`` after its last), else that token, forced, with the
        span marked unverified at its first difference."""
        want = row.expect.pop(0) if row.expect else self.end_id
        recall = row.recalls[-1]
        if choice != want and recall.verified:
            recall.verified, recall.diverged_at = False, row.span_at
            recall.model_token = self.tokenizer.decode([choice])
        row.span_at += 1
        return want

    def _verified_ids(self, recall: Recall, decoded: List[int], stored: List[int]) -> List[int]:
        """A follow-on span's ids under ``verify``: always ``stored``; ``recall`` records
        whether the side pass decoded them (and where it first differed)."""
        recall.verified = decoded == stored
        if not recall.verified:
            at = next((i for i, (a, b) in enumerate(zip(decoded, stored)) if a != b), min(len(decoded), len(stored)))
            recall.diverged_at = at
            recall.model_token = self.tokenizer.decode(decoded[at:at + 1]) if at < len(decoded) else "</recall>"
        return list(stored)

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
        context = row.context_tokens + (0 if row.answer else len(row.generated))
        return Answer(prompt, text, row.recalls, final, list(row.generated), context_tokens=context)
