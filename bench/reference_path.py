"""The reference path: the structure of the original research code, around the SAME TransRec module.

What differs from the project's path, and nothing else:
- routing: a Python loop over sequences x positions calls the item's tower on that ONE item (batch size 1),
  then the vectors are stacked into [B, W, d];
- no de-duplication: every item slot is encoded, each shared negative too (once per batch, as it is one
  slot of the batch);
- fp32, no fused kernels: the losses are the PyTorch references (kernels/pytorch), the optimizer a plain
  torch AdamW with gradient clipping (no DeepSpeed, no ZeRO);
- evaluation: per user, score the whole catalogue, full `argsort`, read the target's position.

Same model: the towers, user encoder and losses are the module's own (same weights, same formulas). When
the project trains from the feature cache of the frozen lower blocks, the reference reads the SAME cache
(equal model computation: only routing and de-duplication differ). Without the cache (the end-to-end
variant) each call runs the whole tower on that item's content from the batch. The equal-work test
(tests/test_throughput_equal_work.py) checks on one batch that both paths give the same fp32 loss and
gradients, and the same rankings.

`expand_slots` gives the project's own path the same "every slot" work, batched (its dedup=False switch).

Note: in train mode, BatchNorm in a trainable image block normalises over one image per call here (the
original code's behaviour); the equal-loss test runs in eval mode, where both paths use running stats.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from transrec.data_shards.batch import ItemContent, SequenceBatch
from transrec.kernels.pytorch.pt_cpc_loss import pt_cpc_loss
from transrec.trainer.core.model import in_tower_dtype, optimizer_param_groups

Span = Callable[[str], AbstractContextManager]


def _no_span(name: str) -> AbstractContextManager:
    return nullcontext()


class ReferencePath:
    """Per-position routing, every slot encoded, PyTorch-reference losses, on a TransRec module."""

    def __init__(self, model: torch.nn.Module, span: Span | None = None):
        if getattr(model.cfg, "side_features", False):
            raise NotImplementedError("the reference path does not model side features")
        if model.id_embedding is not None:
            raise NotImplementedError("the reference path routes content items; IDRec has no towers")
        self.model = model
        self.span = span or _no_span
        self.modality = model.item_modality.tolist()  # Python routing table, as in the research code
        self.encoded = 0  # items encoded since the last reset (one tower call each)

    # -- items ----------------------------------------------------------------------------------------
    def encode_one(self, item: int, content=None, row_of: dict[int, int] | None = None) -> torch.Tensor:
        """The item's tower on that one item: cached lower features by id, else its content. -> [d]."""
        name = self.model.modality_names[self.modality[item]]
        tower = self.model.towers[name]
        cache = self.model.cache
        dtype = tower.proj[0].weight.dtype
        device = self.model.item_modality.device
        self.encoded += 1
        with self.span(f"{name} tower"):
            if cache is not None and cache.covers(name):
                idx = torch.tensor([item], device=device)
                return tower.upper(in_tower_dtype(cache.features(name, idx), dtype))[0]
            if content is None or row_of is None:
                raise RuntimeError(f"the {name} tower is not cached: the reference needs the batch's content")
            pos = self._group_pos(content.rows[name], row_of[item])
            return tower(in_tower_dtype({k: v[pos : pos + 1] for k, v in content.inputs[name].items()}, dtype))[0]

    @staticmethod
    def _group_pos(group_rows: torch.Tensor, row: int) -> int:
        return int(torch.searchsorted(group_rows, torch.tensor(row, device=group_rows.device)))

    @staticmethod
    def _row_of(batch) -> dict[int, int] | None:
        """item id -> row of the batch's content (only used without the feature cache)."""
        if batch.content is None:
            return None
        return {int(v): r for r, v in enumerate(batch.unique_items.tolist())}

    def sequence_vectors(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, W, d] item vectors, one tower call per (sequence, position); zeros at padding."""
        items = batch.items.tolist()
        content, row_of = batch.content, self._row_of(batch)
        d = self.model.cfg.d
        zero = None
        rows = []
        for seq in items:
            vecs = []
            for item in seq:
                if item < 0:
                    if zero is None:
                        zero = torch.zeros(d, device=batch.items.device, dtype=self._dtype())
                    vecs.append(zero)
                else:
                    vecs.append(self.encode_one(item, content, row_of))
            rows.append(torch.stack(vecs))
        return torch.stack(rows), batch.items >= 0

    def _dtype(self) -> torch.dtype:
        return next(iter(self.model.towers.values())).proj[0].weight.dtype

    # -- losses ---------------------------------------------------------------------------------------
    def stage2_loss(self, batch, n_continuation: int) -> torch.Tensor:
        """CPC loss (Eq. 9) with the history's user vector; negatives encoded one by one."""
        vecs, mask = self.sequence_vectors(batch)
        row_of = self._row_of(batch)
        neg = torch.stack([self.encode_one(n, batch.content, row_of) for n in batch.negatives.tolist()])
        with self.span("user encoder"):
            user = self.model.user_vector(vecs[:, :-n_continuation], mask[:, :-n_continuation])
        with self.span("loss"):
            real = batch.weights > 0
            pos_mask = mask[:, -n_continuation:] & real[:, None]
            neg_mask = (batch.negatives[None, :, None] != batch.items[:, None, :]).all(-1) & real[:, None]
            # As trainer/core/model.py: scores u.v / sqrt(d); positives and negatives averaged separately, then added.
            u, pos = user * self.model.cfg.d**-0.5, vecs[:, -n_continuation:]
            none_pos, none_neg = torch.zeros_like(pos_mask), torch.zeros_like(neg_mask)
            return pt_cpc_loss(u, pos, neg, pos_mask, none_neg) + pt_cpc_loss(u, pos, neg, none_pos, neg_mask)

    def stage1_loss(self, batch) -> torch.Tensor:
        """Next-item softmax over the whole catalogue from full [M, V] logits (F.cross_entropy)."""
        vecs, mask = self.sequence_vectors(batch)
        with self.span("user encoder"):
            h = self.model.encode_sequence(vecs[:, :-1], mask[:, :-1])
        with self.span("loss"):
            target = batch.items[:, 1:].clone()
            valid = mask[:, :-1] & mask[:, 1:] & (batch.weights[:, None] > 0)
            target[~valid] = -100
            head = self.model.head
            logits = h.flatten(0, 1).float() @ head.weight.float().T + head.bias.float()
            if self.model.cfg.stage1_relu:
                logits = torch.relu(logits)
            return F.cross_entropy(logits, target.flatten(), ignore_index=-100)

    def loss(self, batch, stage: int, n_continuation: int) -> torch.Tensor:
        return self.stage1_loss(batch) if stage == 1 else self.stage2_loss(batch, n_continuation)


class ReferenceTrainer:
    """The reference's training step: forward by ReferencePath, loss.backward(), gradient clipping and a
    plain AdamW with the trainer's two parameter groups (the towers' backbone blocks at tower_lr)."""

    def __init__(self, model: torch.nn.Module, sc, span: Span | None = None):
        self.path, self.sc, self.span = ReferencePath(model, span), sc, span or _no_span
        groups = optimizer_param_groups(model, sc.lr, sc.tower_lr)
        self.opt = torch.optim.AdamW(groups, lr=sc.lr, weight_decay=sc.weight_decay)
        self.params = [p for g in groups for p in g["params"]]

    def step(self, batch, stage: int) -> torch.Tensor:
        with self.span("forward"):
            loss = self.path.loss(batch, stage, self.sc.n_continuation)
        with self.span("backward"):
            loss.backward()
        with self.span("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.params, self.sc.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def warm_up(self, batch, stage: int) -> None:
        """Forward and backward on the batch's first slots only: one-time costs without a whole slow step."""
        small = dataclasses.replace(batch, items=batch.items[:2], weights=batch.weights[:2],
                                    negatives=batch.negatives[:4])
        self.path.loss(small, stage, self.sc.n_continuation).backward()
        self.opt.zero_grad(set_to_none=True)

    @staticmethod
    def encoded_items(batch, stage: int) -> torch.Tensor:
        """The items the towers run on: every present slot, then (stage 2) each negative."""
        items = batch.items[batch.items >= 0]
        return torch.cat([items, batch.negatives]) if stage == 2 else items


# -- the project's batch without de-duplication ---------------------------------------------------
def expand_slots(batch: SequenceBatch) -> SequenceBatch:
    """The project's dedup=False switch: the same batch WITHOUT de-duplication. Every item slot (and every
    negative) becomes its own entry of `unique_items`, so the project's model encodes each slot, batched, as
    the reference does one by one. The loss is unchanged (tested)."""
    present = batch.items >= 0
    src = torch.cat([batch.slots[present], batch.negative_slots])  # old unique row of each new entry
    slots = torch.full_like(batch.slots, -1)
    slots[present] = torch.arange(int(present.sum()), device=slots.device)
    c = batch.content
    if c is not None:  # end to end: each entry's content row, copied from its old row
        mod, pos = c.modality[src], torch.empty_like(c.modality)  # pos: old row -> place in its modality group
        for rows in c.rows.values():
            pos[rows] = torch.arange(len(rows), device=pos.device)
        expanded = ItemContent(modality=mod)
        for name, rows in c.rows.items():
            code = int(c.modality[rows[0]])
            group = pos[src[mod == code]]  # each new entry's place in the old group
            expanded.rows[name] = (mod == code).nonzero(as_tuple=True)[0]
            if name in c.inputs:
                expanded.inputs[name] = {k: v[group] for k, v in c.inputs[name].items()}
            if name in c.payloads:
                expanded.payloads[name] = [c.payloads[name][int(i)] for i in group]
        c = expanded
    n = int(present.sum())
    # New unique rows: the loader's routing no longer applies (the model routes on the device); `keep` still does.
    return dataclasses.replace(batch, slots=slots, unique_items=batch.unique_items[src], content=c, routing=None,
                               negative_slots=torch.arange(n, n + len(batch.negatives), device=slots.device))


# -- evaluation ---------------------------------------------------------------------------------------
@torch.no_grad()
def reference_ranks(user_vec_fn: Callable[[torch.Tensor, object], torch.Tensor], item_vectors: torch.Tensor,
                    data, positions: np.ndarray, exclude_seen: bool, budget_s: float = math.inf) -> np.ndarray:
    """Per user (a Python loop): user vector, scores against all V items, full argsort, target position.

    Seen items other than the target are pushed to the end (-inf) when excluded. With float scores, ties
    have probability zero (the project counts a tie against the target). Stops after `budget_s` seconds
    (at least 3 users): the ranks of the first users of `positions`."""
    device, out, t0 = item_vectors.device, [], time.perf_counter()
    for p in positions:
        if len(out) >= 3 and time.perf_counter() - t0 > budget_s:
            break
        u = user_vec_fn(torch.as_tensor(data.histories[p : p + 1], device=device), data.take(np.array([p])))[0]
        scores = item_vectors.to(u.dtype) @ u  # [V]
        target = int(data.targets[p])
        if exclude_seen:
            seen = data.seen[p]
            scores[torch.as_tensor(seen[seen != target], device=device)] = float("-inf")
        order = torch.argsort(scores, descending=True)
        out.append(int((order == target).nonzero()[0, 0]) + 1)
    return np.asarray(out, dtype=np.int64)
