"""JPEG bytes -> the image tower's input tensor, on one of three backends with one definition.

The preprocessing (every backend produces exactly this):
    decode JPEG to RGB (EXIF orientation ignored)
    -> resize so the SHORTER side is `size`, bilinear, antialiased (triangle filter when shrinking);
       the longer side becomes round-half-up(size * long / short)          (resized_hw)
    -> centre crop size x size, offset round-half-up((dim - size) / 2)      (center_offset)
    -> uint8 -> float32 (x - 255 * mean) * (1 / (255 * std)), ImageNet      (normalize)
    -> [N, 3, size, size] float32 on the decoder's device.
Both roundings are DALI's own (resize_shorter, crop_pos 0.5). Each axis is stretched to its integer output
size, as Pillow and torchvision do; the DALI graph therefore gets each image's output size explicitly.

Backends (`resolve_backend`):
    "pil"          Pillow, the reference the tests compare against (CPU; result moved to `device`).
    "torchvision"  torchvision.io.decode_jpeg (libjpeg-turbo on CPU, nvjpeg with device="cuda"), then
                   transforms.v2.functional.resize(antialias=True) (per image on CPU, batched per input
                   shape on CUDA), crop by slicing.
    "dali"         NVIDIA DALI pipeline (data_shards/decode_dali.py): "mixed" nvjpeg decode on CUDA,
                   "cpu" decode otherwise; one pipeline per configuration, reused.
    "auto"         DALI on CUDA when DALI imports, else torchvision (on CUDA or CPU).

Agreement with the Pillow reference, measured on every bundled image (803 H&M photos 160x240 and 1,663
MovieLens posters 92 px wide; tests/test_decode.py asserts these bounds):
    decode only (native size, uint8): DALI CPU and torchvision CPU are bit-exact (all libjpeg-turbo).
    full preprocessing at size 64, in normalised units (1 uint8 level = 1/(255*std) <= 0.0175):
        torchvision CPU  max 0.0175 (1 level), mean 2e-5 (H&M 2e-7)
        DALI CPU         max 0.174 (10 levels) in the outermost row/column of an image (DALI clamps the
                         filter at the border, Pillow renormalises it); inside that frame max 0.0175
                         (1 level); mean 2.7e-3 (H&M 1.8e-3)
    Residual 1-level differences are fixed-point (Pillow, torchvision) vs float (DALI) rounding. CUDA paths
    (nvjpeg decode, GPU resize), measured on an H100 with torchvision: max 0.296 / mean 2.4e-3 (H&M),
    max 1.03 / mean 1.1e-2 (MovieLens posters): nvjpeg upsamples chroma unlike libjpeg. DALI on CUDA is
    not measured yet (the GPU machine had no DALI).

Bad images: every JPEG is checked before decoding: it must start with SOI (FFD8) and end with EOI (FFD9)
(trailing bytes after EOI are tolerated only if Pillow then decodes the file fully). A truncated or corrupt
file raises `CorruptImageError` naming the item; a batch decoder failure (DALI, nvjpeg) is re-diagnosed image
by image with Pillow to name the item. Nothing is skipped silently. Not detectable: a file cut inside its
compressed data and then closed with an EOI marker decodes (grey below the cut) in every library, the shard
builder's validation included.

Cache (`cache_bytes` > 0): the uint8 [3, size, size] crop (before normalisation, 3*size*size bytes per item)
keyed by item id, in one preallocated buffer on `device` that grows to the cap; least recently used items
are evicted. Cached and freshly decoded results are bit-identical (normalize() computes what DALI does).
"""

from __future__ import annotations

import io
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from transrec.data_shards.decode_dali import IMAGENET_MEAN, IMAGENET_STD, dali_import_error

BACKENDS = ("auto", "dali", "torchvision", "pil")
REBUILD_HINT = ("rebuild the shards with `python -m transrec.data_shards.build ...`, which validates every image and "
                "drops (and reports) the ones that do not decode")
_EOI_TAIL = 32  # EOI must lie within the last bytes; further trailing data costs one Pillow check

# torchvision 0.29 deprecates its JPEG decoder in favour of TorchCodec and warns on every call.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


class CorruptImageError(ValueError):
    """A JPEG in the shards does not decode; names the item and the fix."""

    def __init__(self, item_id: int, reason: str):
        self.item_id = int(item_id)
        self.reason = reason
        super().__init__(f"item {self.item_id}: corrupt or truncated JPEG ({reason}); {REBUILD_HINT}")


# ----------------------------------------------------------------------------- the spec's geometry


def resized_hw(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (height, width) of the shorter-side resize: the short side is `size`, the long side
    round-half-up(size * long / short), in integers (what DALI's resize_shorter gives)."""
    if height <= width:
        return size, (2 * size * width + height) // (2 * height)
    return (2 * size * height + width) // (2 * width), size


def center_offset(dim: int, crop: int) -> int:
    """First row/column of a centred crop: round-half-up((dim - crop) / 2), as DALI's crop_pos 0.5."""
    return (dim - crop + 1) // 2


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 ImageNet-normalised, (x - 255 * mean) * (1 / (255 * std)).

    Written as DALI's crop_mirror_normalize computes it, so that the DALI path gives the same bits
    whether it normalises in its pipeline or the cache path normalises here."""
    mean = torch.tensor([m * 255 for m in IMAGENET_MEAN], dtype=torch.float32, device=images.device)
    inv_std = torch.tensor([1 / (s * 255) for s in IMAGENET_STD], dtype=torch.float32, device=images.device)
    return (images.float() - mean[:, None, None]) * inv_std[:, None, None]


# ----------------------------------------------------------------------------- checks


def check_jpeg(data: bytes, item_id: int) -> None:
    """Raise CorruptImageError unless `data` starts with SOI and ends with EOI (or fully decodes)."""
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        raise CorruptImageError(item_id, f"no JPEG start marker FFD8 in its {len(data)} bytes")
    if b"\xff\xd9" in data[-_EOI_TAIL:]:
        return
    # No EOI at the end: truncated, or a valid file followed by other data. Only a full decode can tell,
    # and only while Pillow refuses truncated files (its global LOAD_TRUNCATED_IMAGES is off).
    reason = "Pillow's LOAD_TRUNCATED_IMAGES is on" if ImageFile.LOAD_TRUNCATED_IMAGES else pil_failure(data)
    if reason:
        raise CorruptImageError(item_id, f"no JPEG end marker FFD9 at the end, truncated? ({reason})")


def pil_failure(data: bytes) -> str | None:
    """None when Pillow decodes `data` completely as a JPEG, else its reason."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                return f"not a JPEG ({im.format})"
            im.convert("RGB")
    except UnidentifiedImageError:
        return "Pillow cannot identify it as an image"
    except Exception as e:  # noqa: BLE001 - any decoder failure is the reason reported
        return f"{type(e).__name__}: {e}"
    return None


def diagnose(jpegs: Sequence[bytes], item_ids: Sequence[int], error: Exception) -> None:
    """After a batch decoder failed: raise CorruptImageError for the first image Pillow cannot decode.
    Returns (and the caller re-raises `error`) when every image decodes, i.e. the failure is elsewhere."""
    for data, item in zip(jpegs, item_ids):
        reason = pil_failure(data)
        if reason:
            raise CorruptImageError(item, reason) from error  # the batch decoder's own message is chained


# ----------------------------------------------------------------------------- backend choice


def resolve_backend(name: str, device: str | torch.device = "cpu") -> str:
    """The concrete backend ("dali", "torchvision" or "pil") for `name` on `device`.

    ValueError for an unknown name or device type; RuntimeError when the backend or device is unavailable.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown image decoder backend {name!r}: choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"image decoding runs on 'cpu' or 'cuda', not {device.type!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"image decoding on {device} was asked for but torch.cuda.is_available() is False: "
                           "use device='cpu' or run on a GPU machine")
    if name == "dali":
        why = dali_import_error()
        if why:
            raise RuntimeError(f"image decoder backend 'dali' needs NVIDIA DALI, which does not import ({why}); "
                               "or choose backend 'torchvision' or 'auto'")
        return "dali"
    if name == "auto":
        return "dali" if device.type == "cuda" and dali_import_error() is None else "torchvision"
    return name


# ----------------------------------------------------------------------------- host backends


def _pil_one(data: bytes, size: int | None) -> torch.Tensor:
    """Pillow reference: uint8 [3, H, W] (native size when size is None, else size x size)."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
    if size is not None:
        h, w = resized_hw(im.height, im.width, size)
        im = im.resize((w, h), Image.Resampling.BILINEAR)
        top, left = center_offset(h, size), center_offset(w, size)
        im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def _resize_crop(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """uint8 [3, H, W] images -> uint8 [N, 3, size, size].

    On CUDA the images of one shape are stacked and resized in one call (few kernel launches); on CPU each
    image is resized on its own, which is faster than first copying the full-size images into one batch."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    def resize_crop(batch: torch.Tensor) -> torch.Tensor:
        h, w = resized_hw(batch.shape[-2], batch.shape[-1], size)
        batch = F.resize(batch, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=True)
        top, left = center_offset(h, size), center_offset(w, size)
        return batch[..., top : top + size, left : left + size]

    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=images[0].device)
    if out.device.type == "cpu":
        for i, im in enumerate(images):
            out[i] = resize_crop(im)
        return out
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(tuple(im.shape[-2:]), []).append(i)
    for rows in by_shape.values():
        out[torch.tensor(rows, device=out.device)] = resize_crop(torch.stack([images[i] for i in rows]))
    return out


def _torchvision_decode(jpegs: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


# ----------------------------------------------------------------------------- the decoder


class ImageDecoder:
    """Decodes a batch of item JPEGs into the image tower's input [N, 3, size, size] float32 on `device`.

        decoder = ImageDecoder(backend="auto", size=64, device="cuda", cache_bytes=512 << 20)
        pixels = decoder.decode([bytes(store.payload(i, "image")) for i in items], items)
    """

    def __init__(self, backend: str = "auto", size: int = 64, device: str | torch.device = "cpu",
                 max_batch_size: int = 512, cache_bytes: int = 0, num_threads: int = 2):
        if size < 1 or max_batch_size < 1 or num_threads < 1 or cache_bytes < 0:
            raise ValueError("size, max_batch_size and num_threads must be >= 1 and cache_bytes >= 0, got "
                             f"{size}, {max_batch_size}, {num_threads}, {cache_bytes}")
        self.device = torch.device(device)
        self._backend = resolve_backend(backend, self.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.size, self.max_batch_size, self.num_threads = size, max_batch_size, num_threads
        self.images_decoded = 0  # actual decodes; cache hits are not counted
        self.cache_hits = 0
        self.cache_capacity = cache_bytes // (3 * size * size)  # items
        self._slots: OrderedDict[int, int] = OrderedDict()  # item id -> cache row, least recent first
        self._cache: torch.Tensor | None = None  # uint8 [rows, 3, size, size], grows to cache_capacity
        self._pool_: ThreadPoolExecutor | None = None  # host backends' decode threads, made on first use

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # picklable into loader workers: the thread pool is made again there
        state["_pool_"] = None
        return state

    @property
    def _pool(self) -> ThreadPoolExecutor | None:
        if self._pool_ is None and self.num_threads > 1 and self._backend != "dali":
            self._pool_ = ThreadPoolExecutor(self.num_threads, thread_name_prefix="image-decode")
        return self._pool_

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def cache_items(self) -> int:
        return len(self._slots)

    @property
    def cache_bytes_used(self) -> int:
        return 0 if self._cache is None else self._cache.numel()

    def decode(self, jpegs: Sequence[bytes], item_ids: Sequence[int]) -> torch.Tensor:
        """[N, 3, size, size] float32 on the decoder's device, rows in input order."""
        if len(jpegs) != len(item_ids):
            raise ValueError(f"{len(jpegs)} JPEGs but {len(item_ids)} item ids")
        if not self.cache_capacity:
            return self._decode_batch(jpegs, item_ids, normalized=True)
        ids = [int(i) for i in item_ids]
        hit_rows = [r for r, i in enumerate(ids) if i in self._slots]
        miss_rows = [r for r, i in enumerate(ids) if i not in self._slots]
        out = torch.empty((len(ids), 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        if hit_rows:
            slots = []
            for r in hit_rows:
                self._slots.move_to_end(ids[r])
                slots.append(self._slots[ids[r]])
            out[self._index(hit_rows)] = self._cache[self._index(slots)]
            self.cache_hits += len(hit_rows)
        if miss_rows:
            fresh = self._decode_batch([jpegs[r] for r in miss_rows], [ids[r] for r in miss_rows], normalized=False)
            out[self._index(miss_rows)] = fresh
            self._insert([ids[r] for r in miss_rows], fresh)
        return normalize(out)

    def decode_native(self, jpegs: Sequence[bytes], item_ids: Sequence[int]) -> list[torch.Tensor]:
        """Decode only (no resize, crop or normalisation): uint8 [3, H, W] per image, on the device."""
        return self._decode_batch(jpegs, item_ids, normalized=False, native=True)

    # ------------------------------------------------------------------------- internals

    def _index(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _insert(self, ids: list[int], images: torch.Tensor) -> None:
        """Cache freshly decoded uint8 crops; duplicates within the batch and overflow beyond the cap are skipped."""
        take: dict[int, int] = {}
        for row, item in enumerate(ids):
            take.setdefault(item, row)
        items = list(take)[-self.cache_capacity :]  # a batch larger than the cache keeps its last items
        slots = []
        for item in items:
            if len(self._slots) < self.cache_capacity:
                slot = len(self._slots)
            else:
                _, slot = self._slots.popitem(last=False)
            self._slots[item] = slot
            slots.append(slot)
        need = len(self._slots)
        if self._cache is None or self._cache.shape[0] < need:
            rows = min(self.cache_capacity, max(need, 2 * (0 if self._cache is None else self._cache.shape[0])))
            grown = torch.empty((rows, 3, self.size, self.size), dtype=torch.uint8, device=self.device)
            if self._cache is not None:
                grown[: self._cache.shape[0]] = self._cache
            self._cache = grown
        self._cache[self._index(slots)] = images[self._index([take[i] for i in items])]

    def _decode_batch(self, jpegs: Sequence[bytes], item_ids: Sequence[int], normalized: bool,
                      native: bool = False):
        """Check, then decode in chunks of max_batch_size; counts decodes."""
        if not len(jpegs):
            return [] if native else torch.empty((0, 3, self.size, self.size),
                                                 dtype=torch.float32 if normalized else torch.uint8, device=self.device)
        for data, item in zip(jpegs, item_ids):
            check_jpeg(data, item)
        parts = []
        for start in range(0, len(jpegs), self.max_batch_size):
            chunk, ids = jpegs[start : start + self.max_batch_size], item_ids[start : start + self.max_batch_size]
            parts.append(self._decode_chunk(list(chunk), list(ids), normalized, native))
            self.images_decoded += len(chunk)
        if native:
            return [im for part in parts for im in part]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _decode_chunk(self, jpegs: list[bytes], ids: list[int], normalized: bool, native: bool):
        size = None if native else self.size
        if self._backend == "pil":
            run = self._pool.map if len(jpegs) > 1 and self._pool else map  # one image: no thread pool made
            try:
                images = list(run(lambda b: _pil_one(b, size), jpegs))
            except Exception as e:  # any Pillow failure names its item below
                diagnose(jpegs, ids, e)
                raise
            if native:
                return [im.to(self.device) for im in images]
            out = torch.stack(images).to(self.device)
            return normalize(out) if normalized else out
        if self._backend == "torchvision":
            try:
                if self._pool and self.device.type == "cpu" and len(jpegs) > 1:
                    step = -(-len(jpegs) // self.num_threads)
                    chunks = [jpegs[i : i + step] for i in range(0, len(jpegs), step)]
                    images = [im for part in self._pool.map(lambda c: _torchvision_decode(c, self.device), chunks)
                              for im in part]
                else:
                    images = _torchvision_decode(jpegs, self.device)
            except RuntimeError as e:
                diagnose(jpegs, ids, e)
                raise
            if native:
                return images
            out = _resize_crop(images, self.size)
            return normalize(out) if normalized else out
        from transrec.data_shards.decode_dali import drop_pipeline, get_pipeline

        pipeline = get_pipeline(size, self.device, self.max_batch_size, self.num_threads, normalized and not native)
        try:
            return pipeline.run(jpegs, self.device)
        except RuntimeError as e:
            drop_pipeline(pipeline)
            diagnose(jpegs, ids, e)
            raise
