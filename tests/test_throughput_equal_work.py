"""bench/throughput.py compares equal work: the reference path and the project compute the same thing.

On one real batch of the bundled MovieLens shards, with a tiny BERT and ResNet-18 at 32 px (eval mode,
dropout 0, fp32, PyTorch-reference kernels), the per-position reference and the project's de-duplicated
path give the same loss (1e-4) and the same gradients, in stage 2 and stage 1, from the feature cache and
end to end; the bench's dedup-off switch gives the same loss too; the per-user argsort ranking equals the
project's chunked counting ranks; and the analytic FLOP counts (bench/flops.py) match PyTorch's FLOP counter
on a real step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import content_options, image_content, small_model_config

from transrec.bench import flops as fl
from transrec.bench.reference_path import ReferencePath, expand_slots, reference_ranks
from transrec.data_shards.decode import ImageDecoder
from transrec.data_shards.loader import LoaderConfig, make_train_loader
from transrec.data_shards.shard_io import ItemStore, read_sequences
from transrec.kernels import ops as kernels
from transrec.trainer.core import losses
from transrec.trainer.core.feature_cache import FeatureCache
from transrec.trainer.core.model import TransRec
from transrec.trainer.evaluation import ranking as ev

L_CONT = 2  # continuation positions in stage 2

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(ml_shards, tiny_bert_dir):
    """Tiny TransRec with the stage-2 split (top text layer, top image block train) and its feature cache."""
    torch.manual_seed(0)
    kernels.set_default_impl("torch")
    store = ItemStore(ml_shards)
    cfg = small_model_config(tiny_bert_dir, dropout=0.0)
    model = TransRec(cfg, store.num_items, store.modality, {"text": 1, "image": 1}).eval()
    decoder = ImageDecoder(backend="pil", size=32)
    cache = FeatureCache.build(model, store, store.modality, content_options(cfg.text.max_tokens, decoder),
                               torch.device("cpu"), show_progress=False)
    yield model, cache, decoder
    kernels.set_default_impl(None)


def one_batch(shards: Path, window: int, negatives: int, load_content: bool, batch_size: int = 6):
    lc = LoaderConfig(window=window, batch_size=batch_size, stride=window, min_len=3, num_negatives=negatives,
                      load_content=load_content, content=image_content(), shuffle_buffer=64)
    return next(iter(make_train_loader(shards, lc)))


def loss_of(model, batch, stage: int) -> torch.Tensor:
    """The paper's objectives, which the reference path and the FLOP formulas model: free-head softmax, CPC."""
    return losses.free_head_loss(model, batch) if stage == 1 else losses.cpc_loss(model, batch, L_CONT)


def loss_and_grads(model, fn) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def assert_same(a: tuple[float, dict], b: tuple[float, dict]) -> None:
    assert abs(a[0] - b[0]) <= 1e-4, (a[0], b[0])
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("stage", [2, 1])
def test_reference_equals_project_from_cache(setup, ml_shards, stage):
    model, cache, _ = setup
    model.cache = cache
    batch = one_batch(ml_shards, 7 if stage == 2 else 8, 8 if stage == 2 else 0, load_content=False,
                      batch_size=6 if stage == 2 else 16)
    assert batch.unique_items.numel() < (batch.items >= 0).sum() + len(batch.negatives)  # duplicates exist
    ref = ReferencePath(model)
    project = loss_and_grads(model, lambda: loss_of(model, batch, stage))
    reference = loss_and_grads(model, lambda: ref.loss(batch, stage, L_CONT))
    assert_same(project, reference)
    assert ref.encoded == (batch.items >= 0).sum() + (len(batch.negatives) if stage == 2 else 0)  # every slot
    dedup_off = loss_and_grads(model, lambda: loss_of(model, expand_slots(batch), stage))
    assert_same(project, dedup_off)


def test_reference_equals_project_end_to_end(setup, ml_shards):
    """Without the cache: whole towers on the batch's content (tokens, decoded pixels), both paths."""
    model, _, _ = setup
    model.cache = None
    batch = one_batch(ml_shards, 7, 8, load_content=True)
    assert "pixels" in batch.content.inputs["image"] and len(batch.content.rows["text"]) > 0
    project = loss_and_grads(model, lambda: losses.cpc_loss(model, batch, L_CONT))
    reference = loss_and_grads(model, lambda: ReferencePath(model).loss(batch, 2, L_CONT))
    assert_same(project, reference)
    expanded = expand_slots(batch)
    assert len(expanded.unique_items) == (batch.items >= 0).sum() + len(batch.negatives)
    assert_same(project, loss_and_grads(model, lambda: losses.cpc_loss(model, expanded, L_CONT)))


def test_reference_ranking_equals_project(setup, ml_shards):
    model, _, _ = setup
    data = ev.eval_users(read_sequences(ml_shards), "test", model.cfg.max_len)
    data = data.take(np.arange(40))
    iv = torch.randn(3000, model.cfg.d, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def user_vec(hist, _chunk):
        mask = hist >= 0
        return model.user_vector(iv[hist.clamp(min=0)] * mask[..., None], mask)

    for exclude in (True, False):
        project = ev.rank_with_vectors(user_vec, iv, data, exclude, user_batch=16)
        reference = reference_ranks(user_vec, iv, data, np.arange(len(data.users)), exclude)
        np.testing.assert_array_equal(project, reference)
        assert project.min() >= 1 and project.max() > 10  # a real spread of ranks, not all ties


@pytest.mark.parametrize("stage", [2, 1])
def test_analytic_flops_match_flop_counter(setup, ml_shards, stage):
    """Analytic counts vs torch.utils.flop_counter on a real project step (forward + backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model, cache, _ = setup
    model.cache = cache
    batch = one_batch(ml_shards, 7 if stage == 2 else 8, 8 if stage == 2 else 0, load_content=False)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math sdpa: counted bmm
        loss_of(model, batch, stage).backward()
    model.zero_grad(set_to_none=True)
    mods = model.item_modality[batch.unique_items]
    B, W = batch.items.shape
    counts = fl.StepCounts(stage=stage, batch=B, positions=W - (L_CONT if stage == 2 else 1),
                           n_text=int((mods == 0).sum()), n_image=int((mods == 1).sum()), text_width=16,
                           continuation=L_CONT, negatives=len(batch.negatives), catalogue=model.num_items,
                           loss_rows=B * (W - 1))
    analytic = fl.step_flops(model, counts, 32, {"text": True, "image": True}).total
    measured = counter.get_total_flops()
    # The counter skips matrix-vector products (the pooling's tanh(.) w2): ~0.01% here.
    assert analytic == pytest.approx(measured, rel=0.005), (analytic, measured)
