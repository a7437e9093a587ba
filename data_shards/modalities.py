"""What a modality's content is in the shards: the data half of the modality registry.

A `ContentKind` says how one modality's content is stored and loaded: the member suffix of its payload in the item
tars, how a value becomes that payload at build time (`pack`), and how a batch of payloads becomes the tower's input
tensors (`collate`). The model half (the tower, its cacheable blocks, its trainable depth) lives in
trainer/core/modalities.py, which registers both halves with one call; data knows no model.

    register_content(ContentKind("signal", member="signal.f32", collate=my_collate, from_item=my_hook,
                                 settings=SignalSettings(length=12)))

Built in: "text" (token ids of the rendered item text, `tokens.npy`; TextSettings: the token budget) and "image" (the
item's JPEG, `jpg`; ImageSettings: the decoded size and backend). Each kind owns its settings: the loader, the feature
cache, the ranker and serving pass a `ContentSettings` / `ContentOptions` of every modality's own through without
looking inside. A kind
with a `from_item` hook is written by the builder for the items the hook returns a payload for, and those items take
that modality (under `--modality mixed`; the rule is recorded in the manifest). The shards list their modalities in
order in `manifest["modalities"]`: an item's modality code is its index there.

Every other item of a mixed build takes text or image by `modality_choice`, a hash of its raw id; serving applies the
same rule to a new item that comes with both a text and an image, so the rule lives here beside the registry rather
than in the build command.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from transrec.data_shards.decode import ImageDecoder
from transrec.data_shards.shard_io import BUILT_IN_MODALITIES, npy_bytes

MODALITY_RULE = (
    'mixed: text iff sha256("transrec-modality:{seed}:{raw_item_id}")[0] is even; '
    "fallback to the other modality when the chosen one has no content"
)


@dataclass(frozen=True)
class TextSettings:
    """Text content: the token budget (an item's tokens past it are cut); its own run-time options too."""

    max_tokens: int = 64


@dataclass(frozen=True)
class ImageSettings:
    """Image content: the decoded side in pixels and the decoder backend (data_shards/decode.py); at run time, an
    ImageDecoder of these (or None: the JPEGs stay bytes, decoded later in the main process, e.g. on the GPU)."""

    size: int = 64
    backend: str = "auto"


def _identity_pack(value: bytes) -> tuple[bytes, int]:
    return bytes(value), 0


def _settings_are_options(settings, device, decode: bool):
    return settings


@dataclass(frozen=True)
class ContentKind:
    """One modality's content: `member` (payload suffix in the item tar), `collate(payloads, items, options)` ->
    named input tensors (or None: leave the payloads as bytes for a later decode), `pack(value)` -> (member bytes,
    offset of the payload inside them), and the builder hook `from_item(raw_id, item_fields)` -> payload value or None.

    Its options are its own: `settings`, a picklable value of what collating depends on (the default; a run's come
    from the modality's configuration section, trainer/core/modalities.py); `options(settings, device, decode)`, what
    `collate` receives at run time (default: the settings themselves; image: a decoder on `device`, or None when
    `decode` is False); `identity(options)`, what the collated inputs depend on, as a JSON-able dict (part of the
    feature-store key)."""

    name: str
    member: str
    collate: Callable[[list, np.ndarray, object], dict[str, torch.Tensor] | None]
    pack: Callable[[object], tuple[bytes, int]] = _identity_pack
    settings: object = None
    options: Callable[[object, object, bool], object] = _settings_are_options
    identity: Callable[[object], dict] = field(default=lambda options: {})
    from_item: Callable[[str, dict], object | None] | None = None


@dataclass(frozen=True)
class ContentSettings:
    """Every modality's content settings, by name (picklable: loader workers make their options from it); a modality
    without an entry takes its kind's default `settings`."""

    by_modality: Mapping[str, object] = field(default_factory=dict)

    def of(self, name: str) -> object:
        return self.by_modality[name] if name in self.by_modality else content_kind(name).settings

    def options_of(self, name: str, device="cpu", decode: bool = True) -> object:
        """Modality `name`'s run-time options on `device` (`decode` False: content that is decoded, such as JPEGs,
        stays bytes)."""
        return content_kind(name).options(self.of(name), device, decode)

    def options(self, device="cpu", decode: bool = True) -> ContentOptions:
        """Every registered modality's run-time options (options_of)."""
        return ContentOptions({name: self.options_of(name, device, decode) for name in CONTENT})


@dataclass(frozen=True)
class ContentOptions:
    """What collating needs at run time, each modality's own, by name (ContentSettings.options makes them)."""

    by_modality: Mapping[str, object]

    def of(self, name: str) -> object:
        if name not in self.by_modality:
            raise KeyError(f"no content options for modality {name!r} (have: {', '.join(self.by_modality)}): make "
                           "them with ContentSettings.options after the modality is registered")
        return self.by_modality[name]

    def identity(self, name: str) -> dict:
        """What modality `name`'s collated inputs depend on (ContentKind.identity)."""
        return content_kind(name).identity(self.of(name))


def _collate_tokens(payloads: list, items: np.ndarray, options: TextSettings) -> dict[str, torch.Tensor]:
    """Token ids [N, T] (right padded with 0) and mask [N, T]; T = the longest row, at least 1."""
    rows = [np.frombuffer(p, dtype="<i4")[: options.max_tokens] for p in payloads]
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    width = max(int(lengths.max()) if len(rows) else 1, 1)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    mask = np.arange(width)[None, :] < lengths[:, None]
    return {"token_ids": torch.from_numpy(ids), "token_mask": torch.from_numpy(mask)}


def _pack_tokens(tokens: np.ndarray) -> tuple[bytes, int]:
    return npy_bytes(np.asarray(tokens, dtype="<i4"))


def _collate_jpegs(payloads: list, items: np.ndarray, decoder) -> dict[str, torch.Tensor] | None:
    if decoder is None:
        return None
    return {"pixels": decoder.decode([bytes(p) for p in payloads], [int(i) for i in items])}


def _image_decoder(settings: ImageSettings, device, decode: bool):
    return ImageDecoder(backend=settings.backend, size=settings.size, device=device) if decode else None


CONTENT: dict[str, ContentKind] = {}


def register_content(kind: ContentKind) -> None:
    """Add (or replace) a modality's content kind; its name is how shards, loader and model refer to it."""
    if not kind.name.isidentifier():
        raise ValueError(f"modality name {kind.name!r} must be an identifier (letters, digits, underscores)")
    if kind.name in BUILT_IN_MODALITIES and kind.name in CONTENT and CONTENT[kind.name] is not kind:
        raise ValueError(f"{kind.name!r} is a built-in modality and cannot be replaced")
    CONTENT[kind.name] = kind


def content_kind(name: str) -> ContentKind:
    if name not in CONTENT:
        raise KeyError(f"no modality {name!r} is registered (known: {', '.join(CONTENT)}); register its content "
                       "kind (trainer.core.modalities.register) before reading shards that use it")
    return CONTENT[name]


def modality_choice(raw_id: str, seed: int) -> int:
    """The built-in modality a mixed build wants for an item (MODALITY_RULE): 0 text, 1 image. A hash of the raw id,
    not of its position, so an item keeps its modality when the catalogue around it changes."""
    return hashlib.sha256(f"transrec-modality:{seed}:{raw_id}".encode()).digest()[0] % 2


def extra_kinds() -> list[ContentKind]:
    """Registered kinds beyond the built-in ones that the builder can write (they have a `from_item` hook)."""
    return [k for n, k in CONTENT.items() if n not in BUILT_IN_MODALITIES and k.from_item is not None]


register_content(ContentKind("text", member="tokens.npy", collate=_collate_tokens, pack=_pack_tokens,
                             settings=TextSettings(), identity=lambda options: {"size": options.max_tokens}))
register_content(ContentKind("image", member="jpg", collate=_collate_jpegs, settings=ImageSettings(),
                             options=_image_decoder,
                             identity=lambda decoder: {"size": getattr(decoder, "size", None),
                                                       "decoder": getattr(decoder, "backend", None)}))
