"""Where a training step's time goes, per logging window, without a host sync on a step that does not log.

    timer = StepTimer(device)
    for host, batch in prefetched(timer.loader(loader), timer.timed(prepare, "to_device"), device, ahead):
        with timer.span("forward"):
            loss = engine(batch)
        ...
    timer.read()        # on a logging step only: seconds per phase since the last read, then zeroed

The phases (`PHASES`):
- `loader_wait`: host time spent waiting for the loader's next batch (reading shards, and on CPU decoding);
- `to_device`: copying the batch to the device and decoding what is decoded there (JPEGs on CUDA);
- `forward`, `backward`, `optimizer`: the engine's forward, backward (with ZeRO's gradient reduction) and step;
- `checkpoint`: saving resume points inside the epoch.

On CPU every phase is host wall time (`time.perf_counter`): the work is synchronous, so the phases add up to the
step time. On CUDA the device phases are timed with CUDA events recorded on the stream that runs them: recording
an event does not wait for anything, and the events are read only in `read()`, which the trainer calls on logging
steps, after the loss has already been read back (the one host sync a logging step takes). `loader_wait` and
`checkpoint` stay host times there. With batches prepared ahead (`data.device_prefetch`) `to_device` runs on a
side stream beside the step, so on CUDA it overlaps the other phases instead of adding to them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

PHASES = ("loader_wait", "to_device", "forward", "backward", "optimizer", "checkpoint")
HOST_PHASES = ("loader_wait", "checkpoint")  # timed on the host on every device


class StepTimer:
    def __init__(self, device: torch.device, event_factory: Callable[[], object] | None = None):
        """`event_factory`: makes a timing event (CUDA: torch.cuda.Event(enable_timing=True)); None on CPU."""
        if event_factory is None and device.type == "cuda":
            def event_factory():
                return torch.cuda.Event(enable_timing=True)
        self.event_factory = event_factory
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.pending: list[tuple[str, object, object]] = []  # (phase, start event, end event), read on the next read()

    def loader(self, batches: Iterable) -> Iterator:
        """`batches`, with the time spent waiting in next() added to `loader_wait`."""
        source = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(source)
            except StopIteration:
                self.seconds["loader_wait"] += time.perf_counter() - t0
                return
            self.seconds["loader_wait"] += time.perf_counter() - t0
            yield batch

    def timed(self, fn: Callable, phase: str) -> Callable:
        """`fn` with each call timed as `phase`."""
        def call(*args, **kwargs):
            with self.span(phase):
                return fn(*args, **kwargs)
        return call

    @contextmanager
    def span(self, phase: str):
        """Time the block as `phase`: device events on CUDA (recorded on the current stream, read in read()), host
        wall time on CPU and for the host phases."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r} (known: {', '.join(PHASES)})")
        if self.event_factory is None or phase in HOST_PHASES:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[phase] += time.perf_counter() - t0
            return
        start, end = self.event_factory(), self.event_factory()
        start.record()
        try:
            yield
        finally:
            end.record()
            self.pending.append((phase, start, end))

    def read(self) -> dict[str, float]:
        """Seconds per phase since the last read (then zeroed). On CUDA it waits for the recorded events: call it where
        the host waits anyway (a logging step)."""
        for phase, start, end in self.pending:
            end.synchronize()  # events on the step's stream and on the prefetch side stream: each waited for
            self.seconds[phase] += start.elapsed_time(end) / 1000.0  # elapsed_time is in milliseconds
        self.pending = []
        out, self.seconds = self.seconds, dict.fromkeys(PHASES, 0.0)
        return out
