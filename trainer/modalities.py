"""The modality registry: what a modality is, keyed by its name.

A modality is its content in the shards (a `ContentKind`, data_shards/modalities.py: payload member, build-time
packing, collating into input tensors) and its tower (trainer/towers.py `Tower`: cacheable lower blocks, trainable
upper blocks, projection to d, which parameters are backbone). `register` adds both halves with one call; shards,
loader, feature cache, routing, model and trainer then handle the modality by name, and the trainable depth per
stage is `stage1.trainable` / `stage2.trainable`, a {modality: blocks} map (a modality left out trains 0 blocks).

    register(Modality(ContentKind("signal", member="signal.f32", collate=..., from_item=...),
                      build_tower=lambda cfg, trainable: SignalTower(cfg.d, trainable)))

Built in: "text" (a BERT-family encoder over the item's tokens, model.text_encoder) and "image" (a CNN over the
item's JPEG, model.image_backbone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from transrec.data_shards.modalities import CONTENT, ContentKind, content_kind, register_content
from transrec.data_shards.shard_io import BUILT_IN_MODALITIES
from transrec.trainer.towers import ImageTower, TextTower, Tower


@dataclass(frozen=True)
class Modality:
    """A modality's content kind and the builder of its tower: `build_tower(model_config, trainable_blocks)`."""

    content: ContentKind
    build_tower: Callable[[object, int], Tower]

    @property
    def name(self) -> str:
        return self.content.name


MODALITIES: dict[str, Modality] = {}


def register(modality: Modality) -> None:
    """Make a modality known to the shards, the loader and the model (its content kind and its tower)."""
    register_content(modality.content)
    MODALITIES[modality.name] = modality


def unregister(name: str) -> None:
    """Forget a registered modality (the built-in ones stay)."""
    if name in BUILT_IN_MODALITIES:
        raise ValueError(f"{name!r} is a built-in modality")
    MODALITIES.pop(name, None)
    CONTENT.pop(name, None)


def modality(name: str) -> Modality:
    if name not in MODALITIES:
        raise KeyError(f"no modality {name!r} is registered (known: {', '.join(MODALITIES)}): register it with "
                       "trainer.modalities.register before building a model for shards that use it")
    return MODALITIES[name]


def build_towers(cfg, trainable: dict[str, int], names: tuple[str, ...]) -> nn.ModuleDict:
    """One tower per modality name in `names` (the modalities the catalogue's items use), in that order."""
    return nn.ModuleDict({name: modality(name).build_tower(cfg, trainable.get(name, 0)) for name in names})


def _text_tower(cfg, trainable: int) -> TextTower:
    tower = TextTower(cfg.text_encoder, cfg.d, trainable, cfg.dropout, cfg.activation_checkpointing, cfg.max_tokens)
    tower.set_attention(cfg.text_attention)
    return tower


def _image_tower(cfg, trainable: int) -> ImageTower:
    tower = ImageTower(cfg.image_backbone, cfg.d, trainable, cfg.image_weights, cfg.dropout,
                       cfg.activation_checkpointing)
    tower.set_channels_last(cfg.channels_last)
    return tower


register(Modality(content_kind("text"), _text_tower))
register(Modality(content_kind("image"), _image_tower))
