"""NVIDIA DALI pipelines for the image tower's preprocessing (used by data_shards.decode, backend "dali").

Graph (one per size, device, max batch, output kind; built once and reused by every ImageDecoder):

    fn.external_source("jpegs")                       the batch's JPEG bytes, one uint8 array per image
    -> fn.decoders.image(RGB, EXIF orientation off)   device "mixed" (nvjpeg) on CUDA, "cpu" otherwise
    -> fn.resize(resize_x, resize_y, antialias)       bilinear with a triangle filter when shrinking; the
                                                      sizes come from fn.peek_image_shape in the graph
    -> fn.crop_mirror_normalize(crop=(size, size))    centre crop, CHW, ImageNet mean/std, float32
                                                      (or uint8 without normalisation, for the cache)

`size=None` gives the decode-only graph (HWC uint8 at native size), used to check decoding on its own.
Geometry is the project's spec (data_shards.decode.resized_hw / center_offset): the longer side is
round-half-up(size * long / short), as resize_shorter would give, and the crop offset round-half-up((dim -
size) / 2), as crop_pos 0.5 gives. resize_shorter itself is not used: it keeps one scale for both axes and
samples a centred fractional window, 0.3 px off Pillow and torchvision, which stretch each axis to fill.

Outputs are copied into torch tensors with `nvidia.dali.plugin.pytorch.feed_ndarray`: a preallocated CUDA
tensor on GPU (no host round trip), a CPU tensor otherwise. The copy is needed because DALI reuses its
output buffers on the next run.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dali_import_error() -> str | None:
    """None when DALI imports, else why not (the message names the package to install)."""
    try:
        import nvidia.dali
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except (ImportError, OSError) as e:
        return f"{type(e).__name__}: {e}. Install it with `pip install nvidia-dali-cuda130==2.4.0` (listed in setup.py)"
    return None


@dataclass(frozen=True)
class PipelineKey:
    size: int | None  # None: decode only, native size, HWC uint8
    device_id: int | None  # None: CPU pipeline
    max_batch_size: int
    num_threads: int
    normalize: bool  # True: float32 ImageNet-normalised; False: uint8 (what the cache stores)
    pid: int  # a pipeline built before a fork (DataLoader workers) is never used in the child


class DaliImagePipeline:
    """One built DALI pipeline plus the lock that serialises feed + run on it."""

    def __init__(self, key: PipelineKey):
        import nvidia.dali.math as dmath
        from nvidia.dali import fn, pipeline_def, types

        self.key = key
        size, on_gpu = key.size, key.device_id is not None

        @pipeline_def(batch_size=key.max_batch_size, num_threads=key.num_threads, device_id=key.device_id,
                      prefetch_queue_depth=1, exec_dynamic=True)
        def graph():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                       adjust_orientation=False)
            if size is None:
                return images
            # Output size per image from its header, in integers: resize_hw() of data_shards.decode.
            # (resize_shorter alone would keep one scale for both axes and centre a fractional window;
            # explicit sizes stretch each axis to fill, like Pillow and torchvision.)
            shape = fn.peek_image_shape(jpegs)  # [H, W, C]
            height, width = shape[0], shape[1]
            short = dmath.min(height, width)
            resize_y = (2 * size * height + short) // (2 * short)
            resize_x = (2 * size * width + short) // (2 * short)
            images = fn.resize(images, resize_x=fn.cast(resize_x, dtype=types.FLOAT),
                               resize_y=fn.cast(resize_y, dtype=types.FLOAT), antialias=True,
                               interp_type=types.INTERP_LINEAR)
            if key.normalize:
                return fn.crop_mirror_normalize(
                    images, crop=(size, size), mean=[m * 255 for m in IMAGENET_MEAN],
                    std=[s * 255 for s in IMAGENET_STD], output_layout="CHW", dtype=types.FLOAT)
            return fn.crop_mirror_normalize(images, crop=(size, size), output_layout="CHW", dtype=types.UINT8)

        self.pipe = graph()
        self.pipe.build()
        self.lock = threading.Lock()

    def run(self, jpegs: list[bytes], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
        """Decode at most max_batch_size images; [N, 3, S, S] (or a list of [3, H, W] uint8 when size is None).

        Raises whatever DALI raises on a bad image (the caller diagnoses which one).
        """
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if not 0 < len(jpegs) <= self.key.max_batch_size:
            raise ValueError(f"a DALI batch holds 1..{self.key.max_batch_size} images, got {len(jpegs)}")
        arrays = [np.frombuffer(b, dtype=np.uint8) for b in jpegs]
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        with self.lock:
            self.pipe.feed_input("jpegs", arrays)
            (out,) = self.pipe.run()
            if self.key.size is None:  # ragged: copy each HWC image, then view as CHW
                images = []
                for i in range(len(jpegs)):
                    sample = out[i] if device.type == "cuda" else out.at(i)
                    shape = tuple(sample.shape()) if device.type == "cuda" else sample.shape
                    dst = torch.empty(shape, dtype=torch.uint8, device=device)
                    if device.type == "cuda":
                        feed_ndarray(sample, dst, cuda_stream=stream)
                    else:
                        dst.copy_(torch.from_numpy(np.asarray(sample)))
                    images.append(dst.permute(2, 0, 1))
                return images
            dense = out.as_tensor()
            dtype = torch.float32 if self.key.normalize else torch.uint8
            dst = torch.empty(tuple(dense.shape()), dtype=dtype, device=device)
            feed_ndarray(dense, dst, cuda_stream=stream)
            return dst


_PIPELINES: dict[PipelineKey, DaliImagePipeline] = {}
_PIPELINES_LOCK = threading.Lock()


def get_pipeline(size: int | None, device: torch.device, max_batch_size: int, num_threads: int,
                 normalize: bool) -> DaliImagePipeline:
    """The shared pipeline for this configuration, built on first use (building costs ~0.1-1 s)."""
    if device.type == "cpu":
        device_id = None
    else:
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    key = PipelineKey(size, device_id, max_batch_size, num_threads, normalize, os.getpid())
    with _PIPELINES_LOCK:
        if key not in _PIPELINES:
            _PIPELINES[key] = DaliImagePipeline(key)
        return _PIPELINES[key]


def drop_pipeline(pipeline: DaliImagePipeline) -> None:
    """Forget a pipeline after a failed run, so the next call builds a fresh one whatever state DALI left."""
    with _PIPELINES_LOCK:
        if _PIPELINES.get(pipeline.key) is pipeline:
            del _PIPELINES[pipeline.key]
