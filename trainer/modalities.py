"""The modality registry: what a modality is, keyed by its name.

A modality is its content in the shards (a `ContentKind`, data_shards/modalities.py: payload member, build-time
packing, collating into input tensors) and its tower (trainer/towers.py `Tower`: cacheable lower blocks, trainable
upper blocks, projection to d, which parameters are backbone). `register` adds both halves with one call; shards,
loader, feature cache, routing, model and trainer then handle the modality by name, and the trainable depth per
stage is `stage1.trainable` / `stage2.trainable`, a {modality: blocks} map (a modality left out trains 0 blocks).

    register(Modality(ContentKind("signal", member="signal.f32", collate=..., from_item=...),
                      build_tower=lambda cfg, trainable: SignalTower(cfg.d, trainable)))

Each modality has its own configuration section, `model.<name>.*` (its `config` dataclass); the flat names the
built-in ones had before (model.text_encoder, model.image_size, ...) are still read (`legacy_keys`). Built in:
"text" (a BERT-family encoder over the item's tokens, model.text.encoder) and "image" (a CNN over the item's JPEG,
model.image.backbone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from transrec.data_shards.modalities import CONTENT, ContentKind, content_kind, register_content
from transrec.data_shards.shard_io import BUILT_IN_MODALITIES
from transrec.trainer.config_checks import check_values, one_of
from transrec.trainer.towers import IMAGE_BACKBONES, ImageTower, TextTower, Tower


@dataclass(frozen=True)
class Modality:
    """A modality's content kind, the builder of its tower (`build_tower(model_config, trainable_blocks)`, reading its
    own section as `model_config.<name>`) and its configuration section: `config`, a dataclass whose defaults are the
    section's (`model.<name>.<field>=value` on the command line; None: no settings); `legacy_keys`, flat ModelConfig
    names the section's fields had before sections existed, still read from old run configs, exports and command
    lines ({old name: field}); `presets`, the overrides each preset adds for this modality ({preset: [override]})."""

    content: ContentKind
    build_tower: Callable[[object, int], Tower]
    config: type | None = None
    legacy_keys: dict[str, str] = field(default_factory=dict)
    presets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    architecture: tuple[str, ...] = ()  # fields of the section an export's weights depend on (init-from checks them)
    # what serving needs to turn a new item's content into the tower's input as training did, written into exports:
    # preprocessing(shards_manifest, model_config) -> dict
    preprocessing: Callable[[dict, object], dict] | None = None

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


def default_sections() -> dict[str, object]:
    """Every registered modality's configuration section at its defaults, by name (ModelConfig.sections)."""
    return {name: m.config() for name, m in MODALITIES.items() if m.config is not None}


def legacy_model_keys() -> dict[str, tuple[str, str]]:
    """{flat ModelConfig name of before the sections: (modality, field)} over the registered modalities."""
    return {old: (name, new) for name, m in MODALITIES.items() for old, new in m.legacy_keys.items()}


def preset_overrides(preset: str) -> list[str]:
    """The overrides every registered modality adds to the preset `preset`."""
    return [o for m in MODALITIES.values() for o in m.presets.get(preset, ())]


def export_preprocessing(manifest: dict, cfg) -> dict:
    """Each registered modality's preprocessing record (Modality.preprocessing) and the shards' modality rule."""
    return {**{name: m.preprocessing(manifest, cfg) for name, m in MODALITIES.items() if m.preprocessing},
            "modality_rule": manifest["modality_rule"]}


def build_towers(cfg, trainable: dict[str, int], names: tuple[str, ...]) -> nn.ModuleDict:
    """One tower per modality name in `names` (the modalities the catalogue's items use), in that order."""
    return nn.ModuleDict({name: modality(name).build_tower(cfg, trainable.get(name, 0)) for name in names})


# -- the built-in modalities ---------------------------------------------------------------------------------------
@dataclass
class TextConfig:
    """model.text: the text tower."""

    encoder: str = "minilm"  # "minilm" | "bert-base-random-init" | a local Hugging Face BERT folder
    max_tokens: int = 64  # tokens of an item's text the tower reads
    attention: str = "sdpa"  # the encoder's attention: "sdpa" (fused / flash where available) | "eager"

    def __post_init__(self) -> None:
        check_values(self, "model.text", {"max_tokens": 4})
        one_of("model.text.attention", self.attention, ("sdpa", "eager"))


@dataclass
class ImageConfig:
    """model.image: the image tower."""

    backbone: str = "resnet18"  # "resnet18" | "efficientnet-lite0"
    weights: str | None = None  # local weights for the backbone
    size: int = 64  # the decoded image's side, in pixels
    channels_last: bool = False  # the CNN's inputs and activations in channels-last format (GPU convolutions)
    # cuDNN's per-shape algorithm search for the CNN (CUDA): pays where image batches repeat their shape; every new
    # number of unique images in a step is a new shape, searched once
    cudnn_benchmark: bool = False

    def __post_init__(self) -> None:
        check_values(self, "model.image", {"size": 32})
        one_of("model.image.backbone", self.backbone, tuple(IMAGE_BACKBONES))


def _text_tower(cfg, trainable: int) -> TextTower:
    text = cfg.text
    tower = TextTower(text.encoder, cfg.d, trainable, cfg.dropout, cfg.activation_checkpointing, text.max_tokens)
    tower.set_attention(text.attention)
    return tower


def _image_tower(cfg, trainable: int) -> ImageTower:
    image = cfg.image
    tower = ImageTower(image.backbone, cfg.d, trainable, image.weights, cfg.dropout, cfg.activation_checkpointing)
    tower.set_channels_last(image.channels_last)
    return tower


def _text_preprocessing(manifest: dict, cfg) -> dict:
    """The tokenizer's identity and vocabulary hash, token lengths."""
    return {"tokenizer": manifest["text"]["tokenizer"], "shard_max_tokens": manifest["text"]["max_tokens"],
            "model_max_tokens": cfg.text.max_tokens}


def _image_preprocessing(manifest: dict, cfg) -> dict:
    """The image geometry and normalisation."""
    from transrec.data_shards.decode_dali import IMAGENET_MEAN, IMAGENET_STD  # optional: DALI's module, lazily

    return {"size": cfg.image.size, "geometry": "resize shorter side, centre crop (data_shards.decode)",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "scale": "pixels / 255"}


register(Modality(
    content_kind("text"), _text_tower, TextConfig, preprocessing=_text_preprocessing,
    legacy_keys={"text_encoder": "encoder", "max_tokens": "max_tokens", "text_attention": "attention"},
    presets={"cpu-small": ("model.text.max_tokens=32", "stage2.trainable.text=1"),
             "paper": ("model.text.encoder=bert-base-random-init", "model.text.max_tokens=32",
                       "stage2.trainable.text=2"),
             "tiny": ("model.text.max_tokens=16", "stage2.trainable.text=1")},
))
register(Modality(
    content_kind("image"), _image_tower, ImageConfig, preprocessing=_image_preprocessing,
    legacy_keys={"image_backbone": "backbone", "image_weights": "weights", "image_size": "size",
                 "channels_last": "channels_last", "cudnn_benchmark": "cudnn_benchmark"},
    architecture=("backbone",),
    # cpu-small: EfficientNet-Lite0 with its real ImageNet weights, chosen by measurement on the bundled MovieLens data
    # (RESULTS.md): validation NDCG@10 0.102 against 0.085 for random-init ResNet-18. 128 px: at 64 px the user vectors
    # of H&M image only collapse even from scratch (validation 0.0063 against 0.0147 at 128 px); on the bundled
    # MovieLens, validation 0.1192 / 0.1238 (seeds 0 / 1) against 0.1180-0.1212 / 0.1139 at 64 px (RESULTS.md).
    presets={"cpu-small": ("model.image.backbone=efficientnet-lite0", "model.image.size=128",
                           "stage2.trainable.image=1"),
             "paper": ("model.image.size=224", "stage2.trainable.image=2"),
             "tiny": ("model.image.size=32", "stage2.trainable.image=1")},
))
