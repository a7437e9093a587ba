"""What a modality's content is in the shards: the data half of the modality registry.

A `ContentKind` says how one modality's content is stored and loaded: the member suffix of its payload in the item
tars, how a value becomes that payload at build time (`pack`), and how a batch of payloads becomes the tower's input
tensors (`collate`). The model half (the tower, its cacheable blocks, its trainable depth) lives in
trainer/core/modalities.py, which registers both halves with one call; data knows no model.

    register_content(ContentKind("signal", member="signal.f32", collate=my_collate, from_item=my_hook))

Built in: "text" (token ids of the rendered item text, `tokens.npy`) and "image" (the item's JPEG, `jpg`). A kind
with a `from_item` hook is written by the builder for the items the hook returns a payload for, and those items take
that modality (under `--modality mixed`; the rule is recorded in the manifest). The shards list their modalities in
order in `manifest["modalities"]`: an item's modality code is its index there.

Every other item of a mixed build takes text or image by `modality_choice`, a hash of its raw id; serving applies the
same rule to a new item that comes with both a text and an image, so the rule lives here beside the registry rather
than in the build command.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from transrec.data_shards.shard_io import BUILT_IN_MODALITIES, npy_bytes

MODALITY_RULE = (
    'mixed: text iff sha256("transrec-modality:{seed}:{raw_item_id}")[0] is even; '
    "fallback to the other modality when the chosen one has no content"
)


@dataclass(frozen=True)
class ContentOptions:
    """What collating may depend on: the token budget and the image decoder (None: JPEGs stay bytes, decoded later in
    the main process, e.g. on the GPU)."""

    max_tokens: int = 64
    decoder: object | None = None


def _identity_pack(value: bytes) -> tuple[bytes, int]:
    return bytes(value), 0


@dataclass(frozen=True)
class ContentKind:
    """One modality's content: `member` (payload suffix in the item tar), `collate(payloads, items, options)` ->
    named input tensors (or None: leave the payloads as bytes for a later decode), `pack(value)` -> (member bytes,
    offset of the payload inside them), `input_size(options)` (what the inputs' shape depends on: part of the
    feature-store key), and the builder hook `from_item(raw_id, item_fields)` -> payload value or None."""

    name: str
    member: str
    collate: Callable[[list, np.ndarray, ContentOptions], dict[str, torch.Tensor] | None]
    pack: Callable[[object], tuple[bytes, int]] = _identity_pack
    input_size: Callable[[ContentOptions], object] = field(default=lambda options: None)
    from_item: Callable[[str, dict], object | None] | None = None


def _collate_tokens(payloads: list, items: np.ndarray, options: ContentOptions) -> dict[str, torch.Tensor]:
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


def _collate_jpegs(payloads: list, items: np.ndarray, options: ContentOptions) -> dict[str, torch.Tensor] | None:
    if options.decoder is None:
        return None
    return {"pixels": options.decoder.decode([bytes(p) for p in payloads], [int(i) for i in items])}


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
                             input_size=lambda options: options.max_tokens))
register_content(ContentKind("image", member="jpg", collate=_collate_jpegs,
                             input_size=lambda options: getattr(options.decoder, "size", None)))
