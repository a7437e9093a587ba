"""TransRec: item towers routed by modality, a BERT-style user encoder, and the two stages' losses.

Attention in the user encoder is causal in stage 1, stage 2 and evaluation alike (declared and tested):
the user vector is the final hidden state at the last history position, computed by `user_vector`, the one
function used by stage-2 training and by evaluation. Sequences are left padded, and position embeddings
count from the end (the last item always has position max_len - 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from transrec.data_shards.shard_io import BUILT_IN_MODALITIES
from transrec.trainer.core import id_encoders as baselines
from transrec.trainer.core.choices import ItemEncoder, UserEncoderName, UserState
from transrec.trainer.core.config import ModelConfig
from transrec.trainer.core.modalities import build_towers
from transrec.trainer.core.timing_hook import span


class UserBlock(nn.Module):
    """Post-LN transformer block (BERT layer): self-attention, then a GELU feed-forward."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.ln2 = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)
        self.p = dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, hd)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.p if self.training else 0.0)
        x = self.ln1(x + self.drop(self.out(a.transpose(1, 2).reshape(B, L, d))))
        return self.ln2(x + self.drop(self.ff(x)))


class UserEncoder(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, max_len: int, dropout: float, checkpointing: bool = False,
                 input_scale: float = 1.0):
        super().__init__()
        self.max_len = max_len
        self.input_scale = input_scale  # item vectors x input_scale + position embedding
        self.pos = nn.Embedding(max_len, d)
        nn.init.normal_(self.pos.weight, std=0.02)  # BERT init: positions must not drown the item vectors
        self.ln = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(UserBlock(d, heads, dropout) for _ in range(layers))
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, d] item vectors (left padded), mask [B, L] True = real item -> hidden states [B, L, d]."""
        B, L, _ = x.shape
        if self.max_len < L:
            raise ValueError(f"sequence of {L} items exceeds the user encoder's max_len {self.max_len}")
        pos = torch.arange(self.max_len - L, self.max_len, device=x.device)
        if self.input_scale != 1.0:
            x = x * self.input_scale
        h = self.drop(self.ln(x + self.pos(pos)[None]))
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None] & mask[:, None, :]  # [B, L(query), L(key)]
        allowed = allowed | torch.eye(L, dtype=torch.bool, device=x.device)[None]  # padded queries see themselves
        attn_mask = allowed[:, None]  # [B, 1, L, L]
        for block in self.blocks:
            if self.checkpointing and self.training and h.requires_grad:
                h = checkpoint(block, h, attn_mask, use_reentrant=False)
            else:
                h = block(h, attn_mask)
        return h


def build_user_encoder(cfg: ModelConfig) -> nn.Module:
    """Registry of sequence encoders; each maps (item vectors [B, L, d], mask [B, L]) -> causal states [B, L, d]."""
    if cfg.user_encoder == UserEncoderName.TRANSFORMER:
        return UserEncoder(
            cfg.d, cfg.user_layers, cfg.user_heads, cfg.max_len, cfg.dropout, cfg.activation_checkpointing,
            cfg.sequence_input_scale,
        )
    if cfg.user_encoder == UserEncoderName.GRU:
        return baselines.GRUEncoder(cfg.d, cfg.user_layers, cfg.dropout)
    return baselines.NextItNetEncoder(cfg.d, cfg.user_layers, cfg.dropout)


class FeatureEmbedding(nn.Module):
    """Categorical side features (several values per feature allowed, 0 = unknown) -> one vector."""

    def __init__(self, vocab_sizes: dict[str, int], dim: int):
        super().__init__()
        self.names = sorted(vocab_sizes)
        self.tables = nn.ModuleDict({n: nn.EmbeddingBag(vocab_sizes[n], dim, mode="mean") for n in self.names})
        self.out_dim = dim * len(self.names)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """feats[name]: [N, k] value ids (a bag per row) or [N] (one value per row) -> [N, out_dim]."""
        bags = [feats[n] if feats[n].dim() == 2 else feats[n][:, None] for n in self.names]
        return torch.cat([self.tables[n](b) for n, b in zip(self.names, bags)], dim=-1)


class TransRec(nn.Module):
    """Item encoder (content towers or, for IDRec, an ID table) + user encoder + stage-1 catalogue head."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_items: int,
        item_modality: np.ndarray,
        trainable: dict[str, int],
        user_vocab: dict[str, int] | None = None,
        item_features: dict[str, np.ndarray] | None = None,
        modality_names: tuple[str, ...] = BUILT_IN_MODALITIES,
    ):
        """`item_modality` [V]: each item's modality code, an index into `modality_names` (the shards' list);
        `trainable`: top blocks that train per modality name (-1: all)."""
        super().__init__()
        self.cfg = cfg
        self.num_items = num_items
        self.modality_names = tuple(modality_names)
        d = cfg.d
        codes = np.asarray(item_modality)
        if len(codes) and (codes.min() < 0 or codes.max() >= len(self.modality_names)):
            raise ValueError(f"item modality codes must index the modality names {self.modality_names}")
        self.register_buffer("item_modality", torch.as_tensor(item_modality, dtype=torch.long), persistent=False)
        # The whole catalogue's routing, computed once on the host (a full-catalogue loss encodes it every step).
        self._catalogue_routing = [torch.from_numpy(np.flatnonzero(codes == m))
                                   for m in range(len(self.modality_names))]
        if cfg.item_encoder == ItemEncoder.CONTENT:  # only the towers this catalogue's items are routed to
            used = tuple(self.modality_names[m] for m in np.unique(codes))
            self.towers = build_towers(cfg, trainable, used or self.modality_names)
            self.id_embedding = None
        else:
            self.towers = nn.ModuleDict()
            self.id_embedding = nn.Embedding(num_items, d)
            nn.init.normal_(self.id_embedding.weight, std=0.02)
        for tower in self.towers.values():  # small initial item vectors keep the first scores moderate
            nn.init.normal_(tower.proj[-1].weight, std=0.02)
            nn.init.zeros_(tower.proj[-1].bias)
        self.user_encoder = build_user_encoder(cfg)
        # model.user_state=mean_residual: user state = mean of the history's item vectors + gate x encoder state. The
        # gate starts at 0, so an untrained (or a zero-shot) encoder scores as the content baseline does; shape [1].
        self.user_gate = nn.Parameter(torch.zeros(1)) if cfg.user_state == UserState.MEAN_RESIDUAL else None
        # Stage-1 head W^U [V, d] + b: catalogue-specific, never exported.
        self.head = nn.Linear(d, num_items)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        # log(1 / temperature) of the content softmax (trainer/core/losses.py), shape [1] (DeepSpeed broadcasts no 0-d
        # tensor); trains with model.learn_temperature.
        inverse_temperature = torch.full((1,), -math.log(cfg.temperature))
        self.logit_scale = nn.Parameter(inverse_temperature, requires_grad=cfg.learn_temperature)
        self.side = cfg.side_features
        if self.side:
            self.add_side_features(user_vocab, item_features)
        self.cache = None  # trainer/feature_cache.FeatureCache, set by the trainer
        # Instrumentation (bench/throughput.py): called with a span name around each tower call ("text tower", ...),
        # the user encoder ("user encoder") and the loss ("loss"), it returns the context manager that times it.
        self.spans: Callable[[str], AbstractContextManager] | None = None

    def add_side_features(self, user_vocab: dict[str, int] | None, item_features: dict[str, np.ndarray] | None) -> None:
        """model.side_features: the users' and items' categorical features, each embedded and projected with the
        user / item vector to d (catalogue-specific modules, never exported)."""
        if not user_vocab or not item_features:
            raise ValueError("side_features needs user and item feature vocabularies in the shards' manifest")
        d = self.cfg.d
        self.user_features = FeatureEmbedding(user_vocab, 32)
        self.user_side_proj = nn.Linear(d + self.user_features.out_dim, d)
        self.item_features = FeatureEmbedding({n: int(v.max()) + 1 for n, v in item_features.items()}, 32)
        self.item_side_proj = nn.Linear(d + self.item_features.out_dim, d)
        for name, table in item_features.items():
            self.register_buffer(f"item_feat_{name}", torch.as_tensor(table, dtype=torch.long), persistent=False)

    # -- items --------------------------------------------------------------------------------------------
    def encode_items(self, items: torch.Tensor, content=None, modality: torch.Tensor | None = None,
                     routing: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Vectors [U, d] of unique items: each modality's items in ONE tower call, scattered back by row.

        A tower whose lower blocks are cached reads features by item id; otherwise `content` (the loader's
        ItemContent for these items, rows aligned with `items`) supplies tokens / pixels. `routing` (per modality
        index, the rows of `items` routed to its tower, computed on the host by the loader) spares the step a device
        read-back; without it the rows come from `modality` (default: each item's own) on the device."""
        if self.id_embedding is not None:
            vecs = self.id_embedding(items)
        else:
            if routing is None:
                modality = self.item_modality[items] if modality is None else modality
                routing = [(modality == m).nonzero(as_tuple=True)[0] for m in range(len(self.modality_names))]
                host_routed = False
            else:
                host_routed = True
            vecs = None
            if len(routing) != len(self.modality_names):
                raise ValueError(f"routing has {len(routing)} groups for the modalities {self.modality_names}")
            for name, rows in zip(self.modality_names, routing):
                if rows.numel() == 0:
                    continue
                if name not in self.towers:
                    raise ValueError(f"{rows.numel()} items are routed to the {name} tower, which this model does not "
                                     "have (it was built for a catalogue without such items)")
                with span(self, f"{name} tower"):
                    out = self._tower_vectors(name, items, rows, content, host_routed)
                if vecs is None:
                    vecs = out.new_zeros(len(items), out.shape[-1])
                vecs = vecs.index_copy(0, rows, out)
        if self.side:
            feats = {n: getattr(self, f"item_feat_{n}")[items] for n in self.item_features.names}
            vecs = self.item_side_proj(torch.cat([vecs, self.item_features(feats).to(vecs.dtype)], dim=-1))
        return vecs

    def encode_catalogue(self, item_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Vectors [V, d] of every catalogue item (rows = item ids), routed by the routing computed at start; with
        `item_range` (lo, hi), of a mixture's catalogue holding items [lo, hi) only (rows = item id - lo)."""
        device = self.item_modality.device
        if item_range is not None and tuple(item_range) != (0, self.num_items):
            lo, hi = item_range
            items = torch.arange(lo, hi, device=device)
            return self.encode_items(items, routing=self._span_routing(lo, hi, device))
        items = torch.arange(self.num_items, device=device)
        if self.id_embedding is not None:
            return self.encode_items(items)
        if self._catalogue_routing[0].device != device:
            self._catalogue_routing = [r.to(device) for r in self._catalogue_routing]
        return self.encode_items(items, routing=self._catalogue_routing)

    def _span_routing(self, lo: int, hi: int, device: torch.device) -> list[torch.Tensor] | None:
        """The routing of items [lo, hi), computed on the host once per span and kept on the device."""
        if self.id_embedding is not None:
            return None
        cache = self.__dict__.setdefault("_span_routings", {})
        if (lo, hi, device) not in cache:
            cache[(lo, hi, device)] = [(r[(r >= lo) & (r < hi)] - lo).to(device) for r in
                                       (g.cpu() for g in self._catalogue_routing)]
        return cache[(lo, hi, device)]

    def _tower_vectors(self, name: str, items: torch.Tensor, rows: torch.Tensor, content,
                       host_routed: bool = False) -> torch.Tensor:
        tower = self.towers[name]
        dtype = tower.proj[0].weight.dtype
        if self.cache is not None and self.cache.covers(name):
            return tower.upper(in_tower_dtype(self.cache.features(name, items[rows]), dtype))
        if content is None:
            raise RuntimeError(
                f"the {name} tower trains every block but the batch carries no content: "
                "the loader must run with load_content=True"
            )
        if name not in content.inputs:
            raise RuntimeError(f"the batch's {name} content is not decoded: decode its payloads "
                               "(the content kind's collate) before the step")
        group_rows = content.rows[name]
        if host_routed:  # the loader grouped the content by the same routing: its rows are `rows`, in order
            if group_rows.numel() != rows.numel():
                raise RuntimeError("item content does not match the routed modality: loader and model disagree")
            inputs = content.inputs[name]
        else:
            pos = _positions(group_rows, rows)
            inputs = {k: v[pos] for k, v in content.inputs[name].items()}
        return tower(in_tower_dtype(inputs, dtype))

    # -- users --------------------------------------------------------------------------------------------
    def encode_sequence(self, vecs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The user state at every position [B, L, d] (causal): the user encoder's hidden states, or, with
        `model.user_state=mean_residual`, the mean of the item vectors so far plus the gated encoder states."""
        with span(self, "user encoder"):
            h = self.user_encoder(vecs, mask)
        if self.user_gate is None:
            return h
        return history_means(vecs, mask) + self.user_gate.to(h.dtype) * h

    def user_vector(self, vecs: torch.Tensor, mask: torch.Tensor, user_feats: dict | None = None) -> torch.Tensor:
        """THE user vector (stage 2 and evaluation): the last position's state [B, d] (encode_sequence)."""
        u = self.encode_sequence(vecs, mask)[:, -1]
        return self.with_user_features(u, user_feats)

    def with_user_features(self, u: torch.Tensor, user_feats: dict | None) -> torch.Tensor:
        if not self.side:
            return u
        return self.user_side_proj(torch.cat([u, self.user_features(user_feats).to(u.dtype)], dim=-1))

    # -- what the losses read (trainer/core/losses.py) -----------------------------------------------------------
    def slot_vectors(self, batch, item_vecs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch.slots >= 0
        return item_vecs[batch.slots.clamp(min=0)] * mask[..., None].to(item_vecs.dtype), mask

    def position_states(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the dense objectives: the batch's unique item vectors [U, d], the causal states [B, W - 1, d] of
        every input position (each predicts the next item; user features joined when the model has them) and the
        slot mask [B, W] (True = a real item)."""
        item_vecs = self.encode_items(batch.unique_items, batch.content, routing=getattr(batch, "routing", None))
        vecs, mask = self.slot_vectors(batch, item_vecs)
        h = self.encode_sequence(vecs[:, :-1], mask[:, :-1])
        if self.side:
            h = self.with_user_features(h.flatten(0, 1), repeat_features(batch.user_features, h.shape[1])).view_as(h)
        return item_vecs, h, mask

    def forward(self, batch, objective) -> torch.Tensor:
        """The training loss of `objective`, a component from trainer/core/losses.py (chosen by config), times its
        catalogue's weight in a mixture (the mixing rule)."""
        loss = objective(self, batch)
        weighted = getattr(objective, "weighted", None)
        return loss if weighted is None else weighted(loss, batch)

    def stage1_scores(self, h: torch.Tensor) -> torch.Tensor:
        z = h @ self.head.weight.T + self.head.bias
        return F.relu(z) if self.cfg.stage1_relu else z

    def export_state(self) -> dict[str, torch.Tensor]:
        """Towers + user encoder (+ side projections), without catalogue-specific parts."""
        skip = ("head.", "id_embedding.", "item_features.", "item_side_proj.", "logit_scale")
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}


def history_means(vecs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, d]: at each position, the mean of the real item vectors up to it (left padding: zero vectors, not
    counted); a position with none so far gets zeros."""
    m = mask.to(vecs.dtype)[..., None]
    total = (vecs * m).cumsum(1)
    return total / m.cumsum(1).clamp(min=1)


def kept_positions(batch, mask: torch.Tensor) -> torch.Tensor:
    """Flat indices into [B, W - 1] of the (position, next item) pairs that enter a dense loss (both slots real, the
    sample's weight > 0; `mask` = slots >= 0): the loader's host-side `keep`, or (a batch made without a plan) the
    same rule compacted on the device, which reads the device back."""
    keep = getattr(batch, "keep", None)
    if keep is not None:
        return keep
    valid = mask[:, :-1] & mask[:, 1:] & (batch.weights[:, None] > 0)
    return valid.flatten().nonzero().squeeze(1)


def in_tower_dtype(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors in the tower's dtype; ids and masks as they are."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _positions(group_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Positions inside a modality group of the given unique-item rows (both sorted ascending)."""
    pos = torch.searchsorted(group_rows, rows)
    if pos.numel() and (pos.max() >= len(group_rows) or not torch.equal(group_rows[pos], rows)):
        raise RuntimeError("item content does not match the routed modality: loader and model disagree")
    return pos


def repeat_features(feats: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    return {k: v.repeat_interleave(times, dim=0) for k, v in feats.items()}


def count_parameters(module: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total, trainable


PARAM_GROUP_NAMES = ("main", "tower_backbones")  # optimizer_param_groups' groups, in order (TensorBoard's lr/<name>)


def optimizer_param_groups(model: nn.Module, lr: float, tower_lr: float) -> list[dict]:
    """AdamW groups of the trainable parameters: everything at `lr`, the towers' backbones (each tower says which
    module is its backbone: `tower.backbone()`) at `tower_lr`; the backbone group is left out when nothing in it
    trains."""
    towers = getattr(model, "towers", None) or {}
    backbone = {id(p) for tower in towers.values() for p in tower.backbone().parameters()}
    tower_params, other = [], []
    for p in model.parameters():
        if p.requires_grad:
            (tower_params if id(p) in backbone else other).append(p)
    groups = [{"params": other, "lr": lr}]
    if tower_params:
        groups.append({"params": tower_params, "lr": tower_lr})
    return groups
