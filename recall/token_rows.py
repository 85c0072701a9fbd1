"""Trainable rows for a few token ids, kept in fp32, on top of a frozen embedding.

Why not PEFT ``trainable_token_indices``: it gathers on a CUDA device under ZeRO-3
(fails on CPU), and the original project's bf16 rows trained at lr 1e-5 never moved
(updates rounded to zero). Here the new tokens' rows are ``base_row + delta`` with
``delta`` an fp32 parameter of shape (n_tokens, hidden); the base matrix stays frozen
and in the model's dtype. ``merge_into`` writes ``base + delta`` back into the
embedding matrix (tied output heads see it too), which is what a published model holds.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn


class TrainableTokenRows(nn.Module):
    def __init__(self, embedding: nn.Embedding, token_ids: Sequence[int]):
        super().__init__()
        self.embedding = embedding
        ids = torch.tensor(sorted(set(int(i) for i in token_ids)), dtype=torch.long)
        if ids.numel() == 0 or int(ids.max()) >= embedding.num_embeddings:
            raise ValueError(f"token ids {ids.tolist()} out of range for {embedding.num_embeddings} rows")
        self.register_buffer("token_ids", ids, persistent=False)
        slots = torch.zeros(embedding.num_embeddings, dtype=torch.long)  # 0 = not trainable
        slots[ids] = torch.arange(1, len(ids) + 1)
        self.register_buffer("slots", slots, persistent=False)
        self.delta = nn.Parameter(torch.zeros(len(ids), embedding.embedding_dim, dtype=torch.float32))

    @property
    def weight(self) -> torch.Tensor:  # so code that reads .weight (resize, tying) keeps working
        return self.embedding.weight

    @property
    def num_embeddings(self) -> int:
        return self.embedding.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.embedding.embedding_dim

    def forward(self, input_ids: torch.Tensor, output_hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Input embeddings of ``input_ids``; or, given ``output_hidden``, the fp32 output-side
        logit deltas ``hidden @ delta.T`` for a tied head (computed here, inside this module's
        forward, so ZeRO-3 has gathered ``delta``)."""
        if output_hidden is not None:
            return output_hidden.float() @ self.delta.float().T  # DeepSpeed bf16 holds delta in bf16
        base = self.embedding(input_ids)
        # one-hot (…, n) @ delta: its backward is a small matmul. Indexing a zero-padded delta by
        # slot instead has a backward that accumulates every position into a handful of rows
        # (a sorting index_put: 10 ms a step for a 1B model's batch on an H100)
        onehot = nn.functional.one_hot(self.slots[input_ids], len(self.token_ids) + 1)[..., 1:]
        return base + (onehot.to(self.delta.dtype) @ self.delta).to(base.dtype)

    @torch.no_grad()
    def merge_into(self, embedding: nn.Embedding) -> None:
        w = embedding.weight
        w[self.token_ids] = (w[self.token_ids].float() + self.delta.to(w.device)).to(w.dtype)

    def state(self) -> Dict[str, torch.Tensor]:
        """Everything needed to rebuild these rows on a fresh base model: the ids, the base
        rows the delta was trained on (their initialisation is not stored anywhere else),
        and the delta."""
        return {"token_ids": self.token_ids.cpu(),
                "base_rows": self.embedding.weight[self.token_ids].detach().float().cpu(),
                "delta": self.delta.detach().float().cpu()}

    def load_state(self, state: Dict[str, torch.Tensor]) -> None:
        if not torch.equal(state["token_ids"].cpu(), self.token_ids.cpu()):
            raise ValueError(f"token rows were saved for ids {state['token_ids'].tolist()}, "
                             f"this model trains {self.token_ids.tolist()}")
        with torch.no_grad():
            w = self.embedding.weight
            w[self.token_ids] = state["base_rows"].to(w.device, w.dtype)
            self.delta.copy_(state["delta"])


def install_token_rows(model, token_ids: Sequence[int]) -> TrainableTokenRows:
    """Wrap ``model``'s input embedding so ``token_ids`` rows train in fp32."""
    current = model.get_input_embeddings()
    if isinstance(current, TrainableTokenRows):
        return current
    rows = TrainableTokenRows(current, token_ids)
    model.set_input_embeddings(rows)
    return rows


def uninstall_token_rows(model, merge: bool = True) -> None:
    """Put the plain embedding back, with the trained rows merged into it when ``merge``."""
    rows = model.get_input_embeddings()
    if not isinstance(rows, TrainableTokenRows):
        return
    if merge:
        rows.merge_into(rows.embedding)
    model.set_input_embeddings(rows.embedding)


class TrainableStateMixin:
    """``trainable_state`` / ``load_trainable_state`` for a module holding ``token_rows``:
    every trainable parameter by name (LoRA, projectors, temperature) plus ``token_rows.*``
    (ids, base rows and fp32 delta: see ``TrainableTokenRows.state``), and any buffers
    named in ``extra_state_buffers``."""

    extra_state_buffers: tuple = ()

    def trainable_state(self, full_state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """The small state to save. ``full_state``: a whole-model state dict to read the values
        from instead of the parameters, as the Trainer passes under DeepSpeed, where ZeRO-3
        leaves each rank only a shard (``accelerator.get_state_dict`` gathers it)."""
        rows = self.token_rows
        if full_state is None:
            state = {n: p.detach().cpu().contiguous() for n, p in self._trainable_named()}
            state.update({f"token_rows.{k}": v.contiguous() for k, v in rows.state().items()})
        else:
            pick = self._from_full(full_state)
            state = {n: pick(p) for n, p in self._trainable_named()}
            state.update({"token_rows.token_ids": rows.token_ids.cpu(),
                          "token_rows.base_rows": pick(rows.embedding.weight)[rows.token_ids.cpu()].float(),
                          "token_rows.delta": pick(rows.delta).float()})
        buffers = dict(self.named_buffers())
        state.update({n: buffers[n].detach().cpu().contiguous() for n in self.extra_state_buffers})
        return state

    def _trainable_named(self):
        delta = self.token_rows.delta
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and p is not delta]

    def _from_full(self, full_state: Dict[str, torch.Tensor]):
        aliases: Dict[int, list] = {}
        for name, p in self.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)

        def pick(param: torch.Tensor) -> torch.Tensor:
            for name in aliases.get(id(param), []):
                if name in full_state:
                    return full_state[name].detach().cpu().contiguous()
            raise KeyError(f"the gathered state dict lacks {aliases.get(id(param))}")

        return pick

    def trainable_keys(self) -> set:
        keys = {n for n, _ in self._trainable_named()} | set(self.extra_state_buffers)
        return keys | {"token_rows.token_ids", "token_rows.base_rows", "token_rows.delta"}

    def load_trainable_state(self, state: Dict[str, torch.Tensor]) -> None:
        absent = self.trainable_keys() - set(state)
        if absent:
            raise ValueError(f"checkpoint lacks trainable tensors: {sorted(absent)[:5]}")
        rows = {k.removeprefix("token_rows."): v for k, v in state.items() if k.startswith("token_rows.")}
        self.token_rows.load_state(rows)
        own = self.state_dict()
        rest = {k: (v.reshape(own[k].shape) if k in own and v.shape != own[k].shape and v.numel() == own[k].numel()
                    else v)  # e.g. a 0-d temperature saved before it became shape (1,)
                for k, v in state.items() if not k.startswith("token_rows.")}
        self.load_state_dict(rest, strict=False)


class SmallStateTrainerMixin:
    """For ``transformers.Trainer`` subclasses whose model is a ``TrainableStateMixin``: saves
    and resumes only the small trainable state (``STATE_FILE``), not the frozen base weights."""

    STATE_FILE = "trainable_state.safetensors"

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        import os

        from safetensors.torch import save_file

        from recall.distributed import is_main

        if not is_main():  # one writer; under ZeRO-3 only rank 0 holds the gathered state_dict
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        # under DeepSpeed the Trainer passes the gathered whole-model state_dict (ZeRO-3 shards)
        save_file(model.trainable_state(state_dict), os.path.join(output_dir, self.STATE_FILE))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        import os

        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(model or self.model)
        model.load_trainable_state(load_file(os.path.join(resume_from_checkpoint, self.STATE_FILE)))
