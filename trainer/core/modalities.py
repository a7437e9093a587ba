"""The modality registry: what a modality is, keyed by its name.

A modality is its content in the shards (a `ContentKind`, data_shards/modalities.py: payload member, build-time
packing, collating into input tensors) and its tower (trainer/core/towers.py `Tower`: cacheable lower blocks, trainable
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

import functools
import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from transrec.data_shards.decode import center_offset, resized_hw
from transrec.data_shards.modalities import (
    CONTENT,
    ContentKind,
    ContentOptions,
    ContentSettings,
    ImageSettings,
    TextSettings,
    content_kind,
    register_content,
)
from transrec.data_shards.shard_io import BUILT_IN_MODALITIES
from transrec.data_shards.tokenizer import load_tokenizer
from transrec.trainer.core.config_checks import check_values, one_of
from transrec.trainer.core.text_vocab import check_vocabulary, tokenizer_dir
from transrec.trainer.core.towers import IMAGE_BACKBONES, ImageTower, TextTower, Tower


@dataclass(frozen=True)
class Modality:
    """A modality's content kind, the builder of its tower (`build_tower(model_config, trainable_blocks)`, reading its
    own section as `model_config.<name>`) and its configuration section: `config`, a dataclass whose defaults are the
    section's (`model.<name>.<field>=value` on the command line; None: no settings); `legacy_keys`, flat ModelConfig
    names the section's fields had before sections existed, still read from old run configs, exports and command
    lines ({old name: field}); `presets`, what each preset sets for this modality ({preset: a function that sets typed
    fields of the run's configuration})."""

    content: ContentKind
    build_tower: Callable[[object, int], Tower]
    config: type | None = None
    legacy_keys: dict[str, str] = field(default_factory=dict)
    presets: dict[str, Callable[[object], None]] = field(default_factory=dict)
    architecture: tuple[str, ...] = ()  # fields of the section an export's weights depend on (init-from checks them)
    # what serving needs to turn a new item's content into the tower's input as training did, written into exports:
    # preprocessing(shards_manifest, model_config) -> dict
    preprocessing: Callable[[dict, object], dict] | None = None
    # shards that fit the model: check_shards(shards_manifest, model_config, export_meta or None); ValueError if not
    check_shards: Callable[[dict, object, dict | None], None] | None = None
    # files an export needs beside its weights: export_files(tower, model_config, export_folder) -> entries of the
    # export's config.json; use_export_files(model_config, export_folder, export_meta) points the config at them
    export_files: Callable[[nn.Module, object, Path], dict] | None = None
    use_export_files: Callable[[object, Path, dict], None] | None = None
    backend_settings: Callable[[object], None] | None = None  # process-wide settings the section asks for
    # a short human label of an item from its payload, for the embedding projector: describe(payload, model_config)
    describe: Callable[[bytes, object], str] | None = None
    # a picture of an item from its payload, for the projector's sprite: thumbnail(payload, side) -> uint8 [side,
    # side, 3]
    thumbnail: Callable[[bytes, int], np.ndarray] | None = None
    # the content kind's settings under the model's configuration: content_settings(model_config, decoder) ->
    # a value of the kind's settings type (`decoder`: the run's data.decoder, for content that is decoded); None:
    # the kind's default settings
    content_settings: Callable[[object, str], object] | None = None

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
                       "trainer.core.modalities.register before building a model for shards that use it")
    return MODALITIES[name]


def default_sections() -> dict[str, object]:
    """Every registered modality's configuration section at its defaults, by name (ModelConfig.sections)."""
    return {name: m.config() for name, m in MODALITIES.items() if m.config is not None}


def legacy_model_keys() -> dict[str, tuple[str, str]]:
    """{flat ModelConfig name of before the sections: (modality, field)} over the registered modalities."""
    return {old: (name, new) for name, m in MODALITIES.items() for old, new in m.legacy_keys.items()}


def preset_changes(preset: str) -> list[Callable[[object], None]]:
    """What every registered modality sets in the preset `preset` (functions over the run's configuration)."""
    return [m.presets[preset] for m in MODALITIES.values() if preset in m.presets]


def tower_preset(name: str, trainable: int, **section) -> Callable[[object], None]:
    """A modality's preset: its section's fields (`section`) and the blocks stage 2 trains in its tower."""

    def change(cfg) -> None:
        for key, value in section.items():
            setattr(getattr(cfg.model, name), key, value)
        cfg.stage2.trainable = {**cfg.stage2.trainable, name: trainable}

    return change


def export_preprocessing(manifest: dict, cfg) -> dict:
    """Each registered modality's preprocessing record (Modality.preprocessing) and the shards' modality rule."""
    return {**{name: m.preprocessing(manifest, cfg) for name, m in MODALITIES.items() if m.preprocessing},
            "modality_rule": manifest["modality_rule"]}


def check_shards(manifest: dict, cfg, export_meta: dict | None = None) -> None:
    """Every registered modality's check that shards fit the model (a tokenizer's vocabulary, ...)."""
    for m in MODALITIES.values():
        if m.check_shards:
            m.check_shards(manifest, cfg, export_meta)


def write_export_files(towers: nn.ModuleDict, cfg, folder: Path) -> dict:
    """Each tower's extra export files (Modality.export_files), written into `folder`; their config.json entries."""
    entries = {}
    for name, tower in towers.items():
        if name in MODALITIES and MODALITIES[name].export_files:
            entries.update(MODALITIES[name].export_files(tower, cfg, folder))
    return entries


def use_export_files(cfg, folder: Path, meta: dict) -> None:
    """Point `cfg` (an export's model settings) at the export's own files (Modality.use_export_files)."""
    for m in MODALITIES.values():
        if m.use_export_files:
            m.use_export_files(cfg, folder, meta)


def apply_backend_settings(cfg) -> None:
    for m in MODALITIES.values():
        if m.backend_settings:
            m.backend_settings(cfg)


def content_settings(cfg, decoder: str = "auto") -> ContentSettings:
    """Every registered modality's content settings under the model's configuration (Modality.content_settings; the
    loader's, picklable). `decoder`: the run's data.decoder choice, for the modalities whose content is decoded."""
    return ContentSettings({name: m.content_settings(cfg, decoder) for name, m in MODALITIES.items()
                            if m.content_settings})


def content_options(cfg, decoder: str, device) -> ContentOptions:
    """What collating every modality's content needs at run time under the model's configuration, on `device` (the
    text token budget, an image decoder, ...)."""
    return content_settings(cfg, decoder).options(device)


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


TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TEXT_ENCODER_FILES = "text_encoder"  # the export's folder of the text backbone's config and tokenizer


def _text_check_shards(manifest: dict, cfg, export_meta: dict | None) -> None:
    """The shards were tokenized with the text encoder's vocabulary (and, for an export, the one it was trained on)."""
    check_vocabulary(manifest, cfg.text.encoder)
    trained = (export_meta or {}).get("text", {}).get("tokenizer", {})
    if trained.get("vocab_hash") and trained["vocab_hash"] != manifest["text"]["tokenizer"]["vocab_hash"]:
        raise ValueError(f"these shards were tokenized with another vocabulary than the one the export was trained "
                         f"with ({trained.get('path_name')}): rebuild the shards with that tokenizer")


def _text_export_files(tower: nn.Module, cfg, folder: Path) -> dict:
    """config.json of the text backbone (its weights are in model.safetensors) and its tokenizer's files: the export
    stands alone."""
    out = Path(folder) / TEXT_ENCODER_FILES
    out.mkdir(parents=True, exist_ok=True)
    tower.bert.config.to_json_file(str(out / "config.json"))
    source = Path(tokenizer_dir(cfg.text.encoder))
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, out / name)
    return {"text_encoder_files": TEXT_ENCODER_FILES}


def _text_use_export_files(cfg, folder: Path, meta: dict) -> None:
    if meta.get("text_encoder_files"):  # the export's own backbone shape and tokenizer, not the training machine's
        cfg.text.encoder = str(Path(folder) / meta["text_encoder_files"])


def _image_backend_settings(cfg) -> None:
    torch.backends.cudnn.benchmark = cfg.image.cudnn_benchmark  # CUDA only; nothing else reads it


def _text_preprocessing(manifest: dict, cfg) -> dict:
    """The tokenizer's identity and vocabulary hash, token lengths."""
    return {"tokenizer": manifest["text"]["tokenizer"], "shard_max_tokens": manifest["text"]["max_tokens"],
            "model_max_tokens": cfg.text.max_tokens}


DESCRIBE_CHARS = 60  # characters of an item's text in its projector label


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str):
    return load_tokenizer(path)[0]


def _text_describe(payload: bytes, cfg) -> str:
    """The item's token ids decoded with the text encoder's tokenizer (special tokens left out), the first
    DESCRIBE_CHARS characters."""
    tokens = np.frombuffer(payload, dtype="<i4").tolist()
    return _cached_tokenizer(tokenizer_dir(cfg.text.encoder)).decode(tokens, skip_special_tokens=True)[:DESCRIBE_CHARS]


def _image_thumbnail(payload: bytes, side: int) -> np.ndarray:
    """The JPEG as uint8 [side, side, 3] RGB: shorter side resized to `side` (bilinear), centre crop, the geometry of
    the image tower's input (data_shards/decode.py)."""
    with Image.open(io.BytesIO(payload)) as im:
        im = im.convert("RGB")
    h, w = resized_hw(im.height, im.width, side)
    im = im.resize((w, h), Image.Resampling.BILINEAR)
    top, left = center_offset(h, side), center_offset(w, side)
    return np.array(im.crop((left, top, left + side, top + side)), dtype=np.uint8)


def _image_preprocessing(manifest: dict, cfg) -> dict:
    """The image geometry and normalisation."""
    from transrec.data_shards.decode_dali import IMAGENET_MEAN, IMAGENET_STD  # optional: DALI's module, lazily

    return {"size": cfg.image.size, "geometry": "resize shorter side, centre crop (data_shards.decode)",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "scale": "pixels / 255"}


register(Modality(
    content_kind("text"), _text_tower, TextConfig, preprocessing=_text_preprocessing, check_shards=_text_check_shards,
    export_files=_text_export_files, use_export_files=_text_use_export_files, describe=_text_describe,
    content_settings=lambda cfg, decoder: TextSettings(max_tokens=cfg.text.max_tokens),
    legacy_keys={"text_encoder": "encoder", "max_tokens": "max_tokens", "text_attention": "attention"},
    presets={"cpu-small": tower_preset("text", 1, max_tokens=32),
             "paper": tower_preset("text", 2, encoder="bert-base-random-init", max_tokens=32),
             "tiny": tower_preset("text", 1, max_tokens=16)},
))
register(Modality(
    content_kind("image"), _image_tower, ImageConfig, preprocessing=_image_preprocessing,
    backend_settings=_image_backend_settings, thumbnail=_image_thumbnail,
    content_settings=lambda cfg, decoder: ImageSettings(size=cfg.image.size, backend=decoder),
    legacy_keys={"image_backbone": "backbone", "image_weights": "weights", "image_size": "size",
                 "channels_last": "channels_last", "cudnn_benchmark": "cudnn_benchmark"},
    architecture=("backbone",),
    # cpu-small: EfficientNet-Lite0 with its real ImageNet weights, chosen by measurement on the bundled MovieLens data
    # (RESULTS.md): validation NDCG@10 0.102 against 0.085 for random-init ResNet-18. 128 px: at 64 px the user vectors
    # of H&M image only collapse even from scratch (validation 0.0063 against 0.0147 at 128 px); on the bundled
    # MovieLens, validation 0.1192 / 0.1238 (seeds 0 / 1) against 0.1180-0.1212 / 0.1139 at 64 px (RESULTS.md).
    presets={"cpu-small": tower_preset("image", 1, backbone="efficientnet-lite0", size=128),
             "paper": tower_preset("image", 2, size=224),
             "tiny": tower_preset("image", 1, size=32)},
))
