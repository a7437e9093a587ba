"""Image decoding (data_shards.decode): every backend against the Pillow reference on real shard images.

Shards are built once per session from the bundled data (803 H&M photos 160x240, 1,663 MovieLens posters
92 px wide). Tolerances, in normalised units (one uint8 level = 1 / (255 * std) <= 0.01751):
    decode only, CPU:                     exact (max 0)
    torchvision CPU, full preprocessing:  max 1 level, mean <= 2e-4
    DALI CPU, full preprocessing:         interior max 1 level; outermost row/column max 12 levels
                                          (DALI clamps at the image border, Pillow renormalises); mean <= 0.005
    CUDA (nvjpeg decode, GPU resize):     max 32 levels, mean <= 0.02 (IDCT/upsampling differ): loose
                                          bounds until measured on a GPU machine (`pytest -s` prints them)
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transrec.data_shards import decode_dali
from transrec.data_shards.build import BuildOptions, build
from transrec.data_shards.decode import (
    BACKENDS,
    CorruptImageError,
    ImageDecoder,
    center_offset,
    check_jpeg,
    resized_hw,
    resolve_backend,
)
from transrec.data_shards.shard_io import ItemStore

DATA = Path(__file__).resolve().parent.parent / "data"
LEVEL = 1 / (255 * min(decode_dali.IMAGENET_STD)) + 1e-5  # one uint8 level in normalised units, with float slack
HAS_DALI = decode_dali.dali_import_error() is None
HAS_CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: run on a GPU machine (bench/gpu_check.sh)")
NEEDS_DALI = pytest.mark.skipif(not HAS_DALI, reason="needs NVIDIA DALI (pip install nvidia-dali-cuda130)")

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")
CPU_BACKENDS = ["torchvision", pytest.param("dali", marks=NEEDS_DALI)]
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, tuple[list[bytes], list[int]]]:
    """JPEG bytes and item ids of every image item, per bundled dataset, read back from built shards."""
    out = {}
    for dataset, source in (("hm-fashion", "hm-fashion-fixture"), ("movielens-100k-mm", "movielens-100k-mm")):
        shard_dir = tmp_path_factory.mktemp("decode") / dataset
        build(BuildOptions(dataset=dataset, source=DATA / source, out=shard_dir, modality="image", workers=2))
        store = ItemStore(shard_dir)
        items = [i for i in range(store.num_items) if store.index["image_size"][i] > 0]
        out[dataset] = ([bytes(store.payload(i, "image")) for i in items], items)
    return out


@pytest.fixture(scope="session")
def reference(images) -> dict[str, torch.Tensor]:
    """Pillow's full preprocessing at size 64 of every image, per dataset."""
    pil = ImageDecoder("pil", size=64, num_threads=1)
    return {name: pil.decode(jpegs, items) for name, (jpegs, items) in images.items()}


@pytest.fixture(scope="session")
def native_reference(images) -> dict[str, list[torch.Tensor]]:
    """Pillow's decode only (uint8 [3, H, W] at native size) of every image, per dataset."""
    pil = ImageDecoder("pil", num_threads=1)
    return {name: pil.decode_native(jpegs, items) for name, (jpegs, items) in images.items()}


def sample(images, n: int = 12) -> tuple[list[bytes], list[int]]:
    jpegs, items = images["hm-fashion"]
    return jpegs[:n], items[:n]


def jpeg_of(array: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# ----------------------------------------------------------------------------- agreement with Pillow


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dataset", ["hm-fashion", "movielens-100k-mm"])
def test_native_decode_matches_pil(images, native_reference, dataset, backend, device):
    jpegs, items = images[dataset]
    ref = native_reference[dataset]
    if device == "cuda":
        jpegs, items, ref = jpegs[:200], items[:200], ref[:200]
    got = ImageDecoder(backend, device=device).decode_native(jpegs, items)
    assert [g.shape for g in got] == [r.shape for r in ref]
    if device == "cpu":  # libjpeg-turbo in all three: bit-exact
        assert all(torch.equal(g, r) for g, r in zip(got, ref))
    else:  # nvjpeg: a different IDCT and chroma upsampling
        mean_diff = [(g.cpu().float() - r.float()).abs().mean().item() for g, r in zip(got, ref)]
        print(f"{dataset} {backend} cuda decode: mean |diff| {np.mean(mean_diff):.3f} uint8 levels")
        assert np.mean(mean_diff) <= 2.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dataset", ["hm-fashion", "movielens-100k-mm"])
def test_preprocessing_matches_pil(images, reference, dataset, backend, device):
    jpegs, items = images[dataset]
    got = ImageDecoder(backend, size=64, device=device, max_batch_size=256).decode(jpegs, items)
    assert got.device.type == device
    diff = (got.cpu() - reference[dataset]).abs()
    print(f"{dataset} {backend} {device}: max {diff.max():.4f} mean {diff.mean():.2e} (pytest -s shows this)")
    if device == "cuda":
        # nvjpeg (torchvision on CUDA) upsamples chroma differently from libjpeg: measured on an H100
        # (bench/results/gpu_*.md) max 0.296 / mean 2.4e-3 on the H&M photos, max 1.03 / mean 1.1e-2 on
        # the small MovieLens posters, whose sharp colour edges differ most. Bounds: those, with margin.
        assert diff.max() <= 1.2 and diff.mean() <= 0.015
    elif backend == "torchvision":
        assert diff.max() <= LEVEL and diff.mean() <= 2e-4
    else:
        assert diff[:, :, 1:-1, 1:-1].max() <= LEVEL
        assert diff.max() <= 12 * LEVEL and diff.mean() <= 0.005


# ----------------------------------------------------------------------------- layout and geometry


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["pil", *CPU_BACKENDS])
@pytest.mark.parametrize("size", [37, 64, 100])  # 100 upscales the 92 px posters
def test_layout_and_normalisation(images, backend, size, device):
    jpegs, items = images["movielens-100k-mm"]
    jpegs, items = jpegs[:5] + [jpeg_of(np.full((50, 80, 3), 128, np.uint8), 100)], items[:5] + [99999]
    out = ImageDecoder(backend, size=size, device=device).decode(jpegs, items)
    assert out.shape == (6, 3, size, size) and out.dtype == torch.float32 and out.device.type == device
    mean = torch.tensor(decode_dali.IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(decode_dali.IMAGENET_STD, device=device)[:, None, None]
    pixels = out * std + mean  # back to [0, 1]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert (pixels[-1] - 128 / 255).abs().max() <= 1.5 / 255  # a flat grey stays grey, whatever the kernel


def test_geometry_rules():
    assert resized_hw(240, 160, 64) == (96, 64) and resized_hw(160, 240, 64) == (64, 96)
    assert resized_hw(135, 92, 64) == (94, 64)  # 93.9 rounds up
    assert resized_hw(129, 128, 64) == (65, 64)  # 64.5: half rounds up
    assert resized_hw(64, 64, 64) == (64, 64)
    assert center_offset(94, 64) == 15 and center_offset(93, 64) == 15 and center_offset(64, 64) == 0


@pytest.mark.parametrize("backend", ["pil", *CPU_BACKENDS])
def test_odd_shapes_follow_the_spec(backend):
    """Geometry on shapes whose long side rounds: a vertical ramp shows which rows survive the crop."""
    jpegs, items = [], []
    for h, w in ((130, 92), (133, 92), (92, 151), (129, 128), (70, 50)):
        ramp = np.broadcast_to(np.linspace(0, 255, h, dtype=np.float32)[:, None, None], (h, w, 3))
        jpegs.append(jpeg_of(np.ascontiguousarray(ramp.astype(np.uint8)), 100))
        items.append(len(items))
    ref = ImageDecoder("pil", size=48).decode(jpegs, items)
    got = ImageDecoder(backend, size=48).decode(jpegs, items)
    assert (got - ref)[:, :, 1:-1, 1:-1].abs().max() <= 2 * LEVEL


@pytest.mark.parametrize("backend", ["pil", *CPU_BACKENDS])
def test_exif_orientation_is_ignored(backend):
    """Every backend decodes the stored pixels as they are (an EXIF rotation flag is not applied)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 90, 3), 200, np.uint8)).save(buf, "JPEG", exif=exif.tobytes())
    (image,) = ImageDecoder(backend).decode_native([buf.getvalue()], [0])
    assert image.shape == (3, 40, 90)


def test_decoder_pickles_into_workers(images):
    import pickle

    jpegs, items = sample(images, 4)
    dec = ImageDecoder("torchvision", size=16, cache_bytes=1 << 20)
    first = dec.decode(jpegs, items)
    clone = pickle.loads(pickle.dumps(dec))
    assert torch.equal(clone.decode(jpegs, items), first) and clone.cache_hits == 4


# ----------------------------------------------------------------------------- batching and the cache


@NEEDS_DALI
def test_dali_variable_batches_reuse_one_pipeline(images):
    jpegs, items = images["movielens-100k-mm"]
    jpegs, items = jpegs[:60], items[:60]
    whole = ImageDecoder("dali", size=32, max_batch_size=64).decode(jpegs, items)
    dec = ImageDecoder("dali", size=32, max_batch_size=16)
    before = len(decode_dali._PIPELINES)
    rows, start = [], 0
    for n in (16, 1, 7, 16, 3, 17):  # 17 > max_batch_size: split into two runs
        rows.append(dec.decode(jpegs[start : start + n], items[start : start + n]))
        start += n
    assert len(decode_dali._PIPELINES) == before + 1
    assert torch.equal(torch.cat(rows), whole[:start])
    assert dec.images_decoded == start
    assert dec.decode([], []).shape == (0, 3, 32, 32)


@pytest.mark.parametrize("backend", ["pil", *CPU_BACKENDS])
def test_cache_hits_cap_and_identical_results(images, backend):
    jpegs, items = sample(images, 24)
    size = 32
    plain = ImageDecoder(backend, size=size).decode(jpegs, items)
    dec = ImageDecoder(backend, size=size, cache_bytes=10 * 3 * size * size + 100)  # room for 10 items
    assert dec.cache_capacity == 10

    first = dec.decode(jpegs[:8], items[:8])
    assert torch.equal(first, plain[:8]) and dec.images_decoded == 8 and dec.cache_hits == 0
    again = dec.decode(jpegs[:8], items[:8])
    assert torch.equal(again, plain[:8]) and dec.images_decoded == 8 and dec.cache_hits == 8

    # 4 hits (items 4..7) and 8 misses (8..15): the misses evict the least recently used items 0..3 first.
    mixed = dec.decode(jpegs[4:16], items[4:16])
    assert torch.equal(mixed, plain[4:16]) and dec.images_decoded == 16 and dec.cache_hits == 12
    assert dec.cache_items == 10 and dec.cache_bytes_used <= 10 * 3 * size * size
    assert torch.equal(dec.decode(jpegs[6:16], items[6:16]), plain[6:16]) and dec.cache_hits == 22

    # A batch larger than the cache, with a repeated item, still comes back whole and in order.
    order = list(range(24)) + [3]
    out = dec.decode([jpegs[i] for i in order], [items[i] for i in order])
    assert torch.equal(out, plain[order]) and dec.cache_items == 10


def test_cache_off_by_default(images):
    jpegs, items = sample(images, 4)
    dec = ImageDecoder("pil", size=16)
    dec.decode(jpegs, items)
    dec.decode(jpegs, items)
    assert dec.images_decoded == 8 and dec.cache_hits == 0 and dec.cache_bytes_used == 0


# ----------------------------------------------------------------------------- bad images


def bad_jpegs(good: bytes) -> dict[str, bytes]:
    return {
        "truncated": good[: len(good) // 2],  # a cut-off download: no end marker
        "garbage": bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)),  # no start marker
        "garbage_in_markers": b"\xff\xd8" + bytes(range(256)) * 8 + b"\xff\xd9",  # passes the marker check
        "header_only": good[:600] + b"\xff\xd9",
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["pil", *CPU_BACKENDS])
@pytest.mark.parametrize("kind", ["truncated", "garbage", "garbage_in_markers", "header_only"])
def test_corrupt_jpeg_names_the_item(images, backend, kind, device):
    if backend == "pil" and device == "cuda":
        pytest.skip("the Pillow path decodes on the host for every device; covered by device=cpu")
    jpegs, items = sample(images, 5)
    batch = jpegs[:2] + [bad_jpegs(jpegs[2])[kind]] + jpegs[3:]
    ids = [items[0], items[1], 4242, items[3], items[4]]
    dec = ImageDecoder(backend, size=32, device=device)
    with pytest.raises(CorruptImageError) as err:
        dec.decode(batch, ids)
    assert err.value.item_id == 4242 and "item 4242" in str(err.value)
    assert "python -m transrec.data_shards.build" in str(err.value)
    # The decoder stays usable after the failure.
    assert dec.decode(jpegs, items).shape == (5, 3, 32, 32)


def test_check_jpeg_accepts_trailing_data(images):
    good = sample(images, 1)[0][0]
    check_jpeg(good, 1)
    check_jpeg(good + b"\x00" * 100 + b"padding", 1)  # data after EOI: Pillow confirms the image is whole
    with pytest.raises(CorruptImageError, match="item 7"):
        check_jpeg(good[:-40], 7)
    with pytest.raises(CorruptImageError, match="start marker"):
        check_jpeg(b"", 7)
    assert issubclass(CorruptImageError, ValueError)


# ----------------------------------------------------------------------------- backend choice


def test_resolve_backend_choices(monkeypatch):
    assert resolve_backend("pil") == "pil" and resolve_backend("torchvision", "cpu") == "torchvision"
    assert resolve_backend("auto", "cpu") == "torchvision"
    assert ImageDecoder().backend == "torchvision"
    if HAS_DALI:
        assert resolve_backend("dali", "cpu") == "dali"
    with pytest.raises(ValueError, match="unknown image decoder backend 'nvjpeg'"):
        resolve_backend("nvjpeg")
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        resolve_backend("pil", "meta")
    assert set(BACKENDS) == {"auto", "dali", "torchvision", "pil"}

    # "auto" on CUDA: DALI when it imports, else torchvision (CUDA faked: only the choice is tested).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("transrec.data_shards.decode.dali_import_error", lambda: None)
    assert resolve_backend("auto", "cuda") == "dali" and resolve_backend("auto", "cpu") == "torchvision"
    monkeypatch.setattr("transrec.data_shards.decode.dali_import_error", lambda: "ImportError: no module nvidia.dali")
    assert resolve_backend("auto", "cuda") == "torchvision"
    with pytest.raises(RuntimeError, match="needs NVIDIA DALI.*no module nvidia.dali"):
        resolve_backend("dali", "cuda")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without CUDA")
def test_resolve_backend_cuda_missing():
    with pytest.raises(RuntimeError, match="torch.cuda.is_available"):
        resolve_backend("torchvision", "cuda")
    with pytest.raises(RuntimeError, match="torch.cuda.is_available"):
        ImageDecoder("auto", device="cuda")


def test_bad_arguments(images):
    with pytest.raises(ValueError, match="size"):
        ImageDecoder("pil", size=0)
    with pytest.raises(ValueError, match="2 JPEGs but 1 item ids"):
        ImageDecoder("pil").decode(sample(images, 2)[0], [0])
