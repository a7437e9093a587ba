"""Prepare the next batches on the device while the current step runs (`data.device_prefetch`).

A step's input is the loader's host batch made ready on the device: copied (non-blocking, from pinned memory) and,
for payloads decoded on the device (JPEGs through nvjpeg or DALI), decoded. Done inline, that work sits between two
steps and the device idles through it. Here, on CUDA, the preparation of the next `ahead` batches is queued on a
side stream before the current step is launched, so the copy and the decoding run alongside the step's kernels:

- before preparing, the side stream waits for the work already queued on the step's stream (whatever the
  preparation might read that a step wrote), which at that point does not include the step about to be launched;
- after preparing, an event is recorded on the side stream; the step's stream waits for that event only when the
  batch is handed out, so a step never reads a half-copied batch;
- every device tensor of a handed-out batch is marked as used by the step's stream (`record_stream`), so the caching
  allocator does not give its memory to a later batch prepared on the side stream while the step still reads it.

On CPU there is nothing to overlap: `ahead` batches are prepared in the same one-ahead order, inline (what the tests
check: the same batches, in the same order, and the same training).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


def resolve_ahead(setting: int, device: torch.device) -> int:
    """Batches prepared ahead: the setting, or for -1 (auto) one on CUDA and none elsewhere."""
    if setting < -1:
        raise ValueError(f"data.device_prefetch must be -1 (auto), 0 (inline) or a number of batches, got {setting}")
    if setting == -1:
        return 1 if device.type == "cuda" else 0
    return setting


def tensors_of(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside a batch: dataclass fields, dict values and list/tuple items, recursively."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors_of(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_of(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_of(v)


def prefetched(batches: Iterable, prepare: Callable[[Any], Any], device: torch.device,
               ahead: int) -> Iterator[tuple[Any, Any]]:
    """(host batch, prepared batch) pairs in the loader's order, `ahead` batches prepared before they are needed
    (0: each prepared when its turn comes)."""
    if ahead <= 0:
        for host in batches:
            yield host, prepare(host)
        return
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    pending: deque[tuple[Any, Any, torch.cuda.Event | None]] = deque()
    source = iter(batches)

    def prepare_next() -> None:
        host = next(source, _END)
        if host is _END:
            return
        if side is None:
            pending.append((host, prepare(host), None))
            return
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            ready = prepare(host)
            event = side.record_event()
        pending.append((host, ready, event))

    try:
        for _ in range(ahead):
            prepare_next()
        while pending:
            host, ready, event = pending.popleft()
            if event is not None:
                step_stream = torch.cuda.current_stream(device)
                step_stream.wait_event(event)
                for t in tensors_of(ready):
                    if t.is_cuda:
                        t.record_stream(step_stream)
            prepare_next()
            yield host, ready
    finally:  # stopped early (max_steps, an error): the loader's workers and open shards go now
        close = getattr(source, "close", None)
        if close is not None:
            close()


_END = object()
