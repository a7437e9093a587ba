"""trainer.training.device_prefetch: batches prepared ahead of their step, in the loader's order, with bounded
lookahead.

The side-stream overlap itself needs CUDA; here the one-ahead order runs inline, and
tests/test_training_runs.py checks that training through it is unchanged.
"""

from __future__ import annotations

import pytest
import torch

from transrec.data_shards.batch import ItemContent, SequenceBatch
from transrec.trainer.core.config import DataConfig
from transrec.trainer.training.device_prefetch import prefetched, resolve_ahead, tensors_of

CPU = torch.device("cpu")


@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_same_batches_in_order_with_bounded_lookahead(ahead: int) -> None:
    prepared: list[int] = []

    def prepare(b: int) -> str:
        prepared.append(b)
        return f"ready {b}"

    got = []
    for k, (host, ready) in enumerate(prefetched(range(7), prepare, CPU, ahead)):
        # when batch k is handed out, at most `ahead` later batches have been prepared (all that exist, at the end)
        assert prepared == list(range(min(7, k + 1 + ahead)))
        got.append((host, ready))
    assert got == [(b, f"ready {b}") for b in range(7)]
    assert list(prefetched([], prepare, CPU, ahead)) == []


def test_stopping_early_prepares_no_more() -> None:
    """A stage that stops at max_steps leaves the rest of the loader unread, beyond the batches prepared ahead."""
    prepared: list[int] = []
    stream = prefetched(range(100), lambda b: prepared.append(b) or b, CPU, 2)
    for host, _ in stream:
        if host == 4:
            break
    stream.close()
    assert prepared == list(range(7))


def test_tensors_of_a_batch() -> None:
    """Every tensor of a batch is found (what is marked as used by the step's stream on CUDA), payload bytes are not."""
    t = [torch.full((2,), float(i)) for i in range(12)]
    content = ItemContent(t[0], {"text": t[1], "image": t[2]}, {"text": {"ids": t[3], "mask": t[4]}},
                          {"image": [b"jpeg"]})
    batch = SequenceBatch(t[5], t[6], t[7], t[8], t[9], t[10], t[11], torch.zeros(0), content=content,
                          user_features={"age": torch.ones(2, 1)}, routing=[torch.arange(2)], keep=None)
    found = list(tensors_of(batch))
    assert len(found) == 12 + 1 + 1 + 1  # the twelve above, negative_slots, the feature, the routing rows
    assert all(any(x is y for y in found) for x in t)


def test_auto_and_bad_settings() -> None:
    assert resolve_ahead(-1, CPU) == 0 and resolve_ahead(-1, torch.device("cuda")) == 1
    assert resolve_ahead(0, torch.device("cuda")) == 0 and resolve_ahead(3, CPU) == 3
    with pytest.raises(ValueError, match="device_prefetch"):
        resolve_ahead(-2, CPU)
    with pytest.raises(ValueError, match="device_prefetch"):
        DataConfig(device_prefetch=-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the side-stream ordering (bench/gpu_all.sh)")
def test_side_stream_batches_arrive_whole_while_the_step_stream_is_busy() -> None:
    """Pinned host batches copied and transformed on the side stream while the step stream runs long kernels:
    every batch the step reads equals its host batch, and its memory is not reused under it."""
    dev = torch.device("cuda")
    hosts = [torch.full((1 << 22,), float(i)).pin_memory() for i in range(6)]

    def prepare(h: torch.Tensor) -> torch.Tensor:
        return h.to(dev, non_blocking=True) * 2.0 + 1.0

    busy = torch.randn(4096, 4096, device=dev)
    whole, seen = [], []
    for host, ready in prefetched(hosts, prepare, dev, 2):
        for _ in range(4):  # the step stream is busy while the next batches are copied
            busy = torch.tanh(busy @ busy * 1e-4)
        whole.append((ready == 2.0 * float(host[0]) + 1.0).all())  # read on the step stream, checked at the end
        seen.append(float(host[0]))
    assert seen == [float(i) for i in range(6)]
    assert torch.stack(whole).all().item()
