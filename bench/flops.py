"""Analytic model FLOPs of one TransRec training step, for the work the step actually executes.

Counted: every matrix multiply and convolution, 2 FLOPs per multiply-add (elementwise ops, norms, softmax
and gathers are left out, as in the usual MFU convention). Forward of every block that runs; backward
only where autograd computes it: a weight gradient for each trainable weight, an input gradient only where
the input needs one (the lowest trainable block of a tower reads cached / frozen features, so its input
gradient is skipped). Activation-checkpoint recomputation is NOT model work and is not counted (MFU, not
hardware FLOPs utilisation). Frozen lower blocks count only when they run (no feature cache).

Shapes come from the batch: unique items per modality (or every slot, for the paths without
de-duplication), text width T as executed (padded), image size from the config. The image tower's convs
are counted from their shapes in one probe forward of a single image (hooks), because conv output sizes
depend on strides and padding; everything else is a closed formula. `tests/test_throughput_equal_work.py`
checks these counts against torch.utils.flop_counter on a real step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class StepCounts:
    """What one step feeds the model (per rank)."""

    stage: int
    batch: int  # sequences
    positions: int  # positions through the user encoder per sequence
    n_text: int  # items through the text tower
    n_image: int  # items through the image tower
    text_width: int  # tokens per text item as executed (padded)
    continuation: int = 0  # stage 2: l positives per sequence
    negatives: int = 0  # stage 2: shared negatives
    catalogue: int = 0  # stage 1: softmax width V
    loss_rows: int = 0  # stage 1: rows of the catalogue softmax (B x (W - 1))


def batch_counts(model: nn.Module, batch, stage: int, continuation: int, encoded: torch.Tensor,
                 text_width: int) -> StepCounts:
    """StepCounts of a SequenceBatch; `encoded` = the catalogue ids the towers ran on (one per tower row)."""
    mods = model.item_modality[encoded]
    B, W = batch.items.shape
    l = continuation if stage == 2 else 0
    return StepCounts(stage=stage, batch=B, positions=W - (l if stage == 2 else 1), n_text=int((mods == 0).sum()),
                      n_image=int((mods == 1).sum()), text_width=text_width, continuation=l,
                      negatives=len(batch.negatives), catalogue=model.num_items, loss_rows=B * (W - 1))


def executed_text_width(model: nn.Module, batch) -> int:
    """Tokens per text item as the text tower runs them: the cache's padded width, else the batch's."""
    cache = model.cache
    if cache is not None and cache.covers("text"):
        item = (model.item_modality == 0).nonzero()[:1, 0]
        return int(cache.features("text", item)["hidden"].shape[1])
    if batch.content is None or "text" not in batch.content.inputs:
        return 0
    return int(batch.content.inputs["text"]["token_ids"].shape[1])


@dataclass
class StepFlops:
    """Forward and backward FLOPs per section of one step."""

    fwd: dict[str, float] = field(default_factory=dict)
    bwd: dict[str, float] = field(default_factory=dict)

    def add(self, section: str, fwd: float, bwd: float) -> None:
        self.fwd[section] = self.fwd.get(section, 0.0) + fwd
        self.bwd[section] = self.bwd.get(section, 0.0) + bwd

    @property
    def total(self) -> float:
        return sum(self.fwd.values()) + sum(self.bwd.values())


def _any_grad(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def bert_layer(n: int, T: int, H: int, inter: int, trainable: bool, input_grad: bool) -> tuple[float, float]:
    """One BERT layer on n sequences of T tokens: (forward, backward) FLOPs.

    Weights: QKV 3H^2, output H^2, feed-forward 2 H I per token; attention: QK^T and AV, 2 T^2 H each."""
    w_qkv, w_rest = 2 * n * T * 3 * H * H, 2 * n * T * (H * H + 2 * H * inter)
    attn = 4 * n * T * T * H
    fwd = w_qkv + w_rest + attn
    if not trainable:
        return fwd, 0.0
    # dW for every weight; dX for every weight except QKV when the layer input needs no gradient; the two
    # attention matmuls need both of their inputs' gradients (Q, K, V come from trainable weights).
    bwd = (w_qkv + w_rest) + (w_qkv if input_grad else 0.0) + w_rest + 2 * attn
    return fwd, bwd


def attention_pool(n: int, T: int, H: int, A: int, input_grad: bool) -> tuple[float, float]:
    """Additive attention pooling: x W1 (2THA), tanh(.) w2 (2TA), sum_t alpha_t x_t (2TH) per item."""
    fwd = 2 * n * T * (H * A + A + H)
    # dW1, dw2 and d(alpha) always (the pooling weights train); dx through x W1 and the weighted sum only
    # when x needs a gradient (a trainable layer below).
    bwd = 2 * n * T * (H * A + A + H) + (2 * n * T * (H * A + H) if input_grad else 0.0)
    return fwd, bwd


def mlp(n: int, d_in: int, d: int, trainable: bool, input_grad: bool) -> tuple[float, float]:
    """Linear(d_in, d) -> GELU -> Linear(d, d)."""
    first, second = 2 * n * d_in * d, 2 * n * d * d
    fwd = first + second
    if not trainable:
        return fwd, 0.0
    return fwd, first + (first if input_grad else 0.0) + 2 * second


def text_tower(tower: nn.Module, n: int, T: int, cached: bool) -> tuple[float, float]:
    """TextTower (trainer/core/towers.py): frozen lower layers (only without cache), trainable top, pool, MLP."""
    if n == 0:
        return 0.0, 0.0
    cfg = tower.bert.config
    H, inter, split = cfg.hidden_size, cfg.intermediate_size, tower.split
    fwd = bwd = 0.0
    if not cached:
        for _ in range(split):
            f, _ = bert_layer(n, T, H, inter, trainable=False, input_grad=False)
            fwd += f
    input_grad = (not cached) and _any_grad(tower.bert.embeddings)  # trainable = -1 trains the embeddings
    for layer in tower.bert.encoder.layer[split:]:
        f, b = bert_layer(n, T, H, inter, trainable=_any_grad(layer), input_grad=input_grad)
        fwd, bwd = fwd + f, bwd + b
        input_grad = input_grad or _any_grad(layer)
    f, b = attention_pool(n, T, H, tower.pool.w1.shape[1], input_grad)
    fwd, bwd = fwd + f, bwd + b
    f, b = mlp(n, H, tower.proj[-1].out_features, _any_grad(tower.proj), input_grad or _any_grad(tower.pool))
    return fwd + f, bwd + b


def image_blocks_per_item(tower: nn.Module, image_size: int) -> tuple[float, float, float]:
    """(frozen lower forward, trainable upper forward, upper backward) FLOPs for ONE image.

    A probe forward of one image through every block, with hooks on Conv2d / Linear recording each
    layer's forward FLOPs and whether autograd will compute its weight and input gradients; the lower
    blocks' output is detached, as the feature cache (or the frozen part) hands it to the upper blocks."""
    records: list[tuple[str, float, bool, bool]] = []

    def hook(mod: nn.Module, inputs, out) -> None:
        x = inputs[0]
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            f = 2.0 * out.shape[0] * out.shape[1] * out.shape[2] * out.shape[3] * k * mod.in_channels / mod.groups
        else:
            f = 2.0 * out.numel() * mod.in_features
        records.append((part, f, mod.weight.requires_grad, x.requires_grad))

    handles = [m.register_forward_hook(hook) for m in tower.blocks.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = tower.training
    tower.eval()
    try:
        p = next(tower.parameters())
        x = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)
        with torch.enable_grad():
            for i, block in enumerate(tower.blocks):
                part = "lower" if i < tower.split else "upper"
                if i == tower.split:
                    x = x.detach()
                x = block(x)
    finally:
        for h in handles:
            h.remove()
        tower.train(was_training)
    lower = sum(f for part_, f, _, _ in records if part_ == "lower")
    upper = sum(f for part_, f, _, _ in records if part_ == "upper")
    upper_bwd = sum(f * (int(w) + int(xg)) for part_, f, w, xg in records if part_ == "upper")
    return lower, upper, upper_bwd


_PROBED: dict[tuple, tuple[float, float, float]] = {}  # one probe per tower, split, size and trainable set


def image_tower(tower: nn.Module, n: int, image_size: int, cached: bool) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    key = (id(tower), tower.split, image_size, tuple(p.requires_grad for p in tower.parameters()))
    if key not in _PROBED:
        _PROBED[key] = image_blocks_per_item(tower, image_size)
    lower, upper, upper_bwd = _PROBED[key]
    fwd = n * (upper + (0.0 if cached else lower))
    bwd = n * upper_bwd
    width = tower.proj[0].in_features
    input_grad = any(_any_grad(b) for b in tower.blocks[tower.split :])
    f, b = mlp(n, width, tower.proj[-1].out_features, _any_grad(tower.proj), input_grad)
    return fwd + f, bwd + b


def user_encoder(enc: nn.Module, B: int, L: int) -> tuple[float, float]:
    """Post-LN transformer user encoder (trainer/core/model.py UserEncoder): B sequences of L positions.

    Its input LN(x + position embedding) always needs a gradient (the position table trains), so the
    backward is twice the forward for every layer."""
    if not hasattr(enc, "blocks") or not hasattr(enc.blocks[0], "qkv"):
        raise NotImplementedError("FLOP counts cover the transformer user encoder only")
    d = enc.pos.embedding_dim
    fwd = 0.0
    for block in enc.blocks:
        inner = block.ff[0].out_features
        fwd += 2 * B * L * (3 * d * d + d * d + 2 * d * inner) + 4 * B * L * L * d
    return fwd, 2 * fwd


def step_flops(model: nn.Module, counts: StepCounts, image_size: int, cached: dict[str, bool]) -> StepFlops:
    """Model FLOPs of one training step of `model` (TransRec) on a batch described by `counts`."""
    out = StepFlops()
    towers = getattr(model, "towers", {})
    if "text" in towers:
        out.add("text tower", *text_tower(towers["text"], counts.n_text, counts.text_width, cached.get("text", False)))
    if "image" in towers:
        out.add("image tower", *image_tower(towers["image"], counts.n_image, image_size, cached.get("image", False)))
    out.add("user encoder", *user_encoder(model.user_encoder, counts.batch, counts.positions))
    d = model.cfg.d
    if counts.stage == 2:
        f = 2.0 * counts.batch * d * (counts.continuation + counts.negatives)
        out.add("loss", f, 2 * f)  # d(user) and d(items)
    else:
        f = 2.0 * counts.loss_rows * counts.catalogue * d
        out.add("loss", f, 2 * f if model.head.weight.requires_grad else f)  # dh, and dW when the head trains
    return out


def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The MFU denominator: best achieved TFLOP/s of a large square matmul in `dtype`, measured in this run."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 10 if device.type == "cuda" else 3
    best = math.inf
    for i in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first round is warm-up
            best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best / 1e12
