"""The gradient norm of each part of the model, read on logging steps (TensorBoard's `grad_norm/<part>`).

A part is a top-level module of the model, each tower on its own (`towers.<modality>`, `user_encoder`, `head`, ...):
how the towers' gradients compare with the user encoder's is what shows a tower that does not learn, or one that
swamps the rest. The gradients are read after the backward of an optimizer step and before the step, through
DeepSpeed's `safe_get_full_grad`, which gives the whole gradient under every ZeRO stage (under ZeRO 1-3 it gathers the
partitions over the ranks: every rank must call it, which the trainer does, as every rank logs on the same steps).
The norms are of the gradients the optimizer receives, before clipping. They stay on the device: the logging step's
one host read takes them with the loss.
"""

from __future__ import annotations

import torch
from torch import nn


def part_of(parameter_name: str) -> str:
    """'towers.image.backbone.conv1.weight' -> 'towers.image'; 'user_encoder.blocks.0.attn.w' -> 'user_encoder'."""
    parts = parameter_name.split(".")
    return ".".join(parts[:2]) if parts[0] == "towers" and len(parts) > 2 else parts[0]


def trainable_parts(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters that train now (requires_grad), by part, in the model's order."""
    parts: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts.setdefault(part_of(name), []).append(p)
    return parts


def full_grad_reader():
    """p -> p's whole gradient under any ZeRO stage (DeepSpeed's accessor), or p.grad without DeepSpeed."""
    try:
        from deepspeed.utils import safe_get_full_grad  # optional: DeepSpeed's module, lazily
    except ImportError:  # pragma: no cover - the trainer always has DeepSpeed
        return lambda p: p.grad
    return safe_get_full_grad


@torch.no_grad()
def part_grad_norms(parts: dict[str, list[nn.Parameter]]) -> dict[str, torch.Tensor]:
    """{part: L2 norm of its gradient} as 0-d device tensors; a part none of whose parameters has a gradient (not
    reached by this step's loss) is left out."""
    full_grad, norms = full_grad_reader(), {}
    for part, params in parts.items():
        squares = [g.float().pow(2).sum() for g in map(full_grad, params) if g is not None]
        if squares:
            norms[part] = torch.stack(squares).sum().sqrt()
    return norms
