"""Sequence encoders of the ID baselines: GRU4Rec (IDGru) and NextItNet (IDNext).

Both plug into `trainer.model.build_user_encoder` (`model.user_encoder=gru|nextitnet`) and are used through the
same TransRec class with `model.item_encoder=id`, so they share shards, splits, stages, losses and evaluator
with IDRec and TransRec. Contract of the registry: forward(x [B, L, d] item vectors, left padded; mask [B, L]
bool, True = real item) -> hidden states [B, L, d], causal (position t depends on real items <= t only) and
blind to left padding (the values at padded positions and their number do not change any real position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class GRUEncoder(nn.Module):
    """GRU4Rec (Hidasi et al. 2016, as in RecBole): input dropout -> multi-layer GRU -> linear back to d.

    Padding: each row's real items are moved to the front (stable order), packed by length, run, and the
    states scattered back to their positions, so padded inputs never enter the recurrence. Padded positions
    get zero states. Causal by construction (a left-to-right recurrence)."""

    def __init__(self, d: int, layers: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(d, d, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # real positions first, in order
        idx = order[..., None].expand(B, L, d)
        xc = self.drop(x.gather(1, idx))
        lengths = mask.sum(1).clamp(min=1).cpu()  # host sync: pack needs CPU lengths
        packed = pack_padded_sequence(xc, lengths, batch_first=True, enforce_sorted=False)
        hc, _ = self.gru(packed)
        hc, _ = pad_packed_sequence(hc, batch_first=True, total_length=L)  # [B, L, d], zeros past each length
        h = torch.zeros_like(hc).scatter(1, idx, hc)  # back to the original (left padded) positions
        return self.out(h) * mask[..., None].to(h.dtype)


class CausalConv(nn.Module):
    """1-D convolution over positions with left padding (dilation - 1) * (k - 1): output t sees inputs <= t."""

    def __init__(self, d: int, kernel: int, dilation: int):
        super().__init__()
        self.pad = (kernel - 1) * dilation
        self.conv = nn.Conv1d(d, d, kernel, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, d] -> [B, L, d]
        return self.conv(F.pad(x.transpose(1, 2), (self.pad, 0))).transpose(1, 2)


class NextItNetBlock(nn.Module):
    """NextItNet residual block (b): causal conv (dilation r) -> LN -> ReLU -> causal conv (2r) -> LN -> ReLU, + x.

    Every sub-layer output is multiplied by the mask, so padded positions stay exactly zero, the same as the
    implicit zero padding of the convolution: a row's real outputs do not depend on its padding."""

    def __init__(self, d: int, dilation: int, kernel: int, dropout: float):
        super().__init__()
        self.conv1 = CausalConv(d, kernel, dilation)
        self.ln1 = nn.LayerNorm(d)
        self.conv2 = CausalConv(d, kernel, 2 * dilation)
        self.ln2 = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.ln1(self.conv1(x))) * keep
        h = F.relu(self.ln2(self.conv2(h))) * keep
        return x + self.drop(h)


class NextItNetEncoder(nn.Module):
    """NextItNet (Yuan et al. 2019): residual blocks of dilated causal convolutions, kernel 3, dilations
    1, 2, 4, 8 repeated `layers` times (4 * layers blocks), then a layer norm."""

    DILATIONS = (1, 2, 4, 8)

    def __init__(self, d: int, layers: int, dropout: float, kernel: int = 3):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        dilations = [r for _ in range(layers) for r in self.DILATIONS]
        self.blocks = nn.ModuleList(NextItNetBlock(d, r, kernel, dropout) for r in dilations)
        self.ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask[..., None].to(x.dtype)  # [B, L, 1]
        h = self.drop(x) * keep
        for block in self.blocks:
            h = block(h, keep)
        return self.ln(h) * keep
