"""Ranking a split with a model: item vectors once per evaluation, user vectors per user batch, exact ranks over the
whole catalogue (trainer/evaluation/ranking.py). Used by the trainer after each epoch and by the standalone evaluator
(`python -m transrec.trainer.commands.evaluate --export DIR --shards DIR`), which rebuilds the model from an export
alone.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from transrec.data_shards.batch import load_item_content
from transrec.data_shards.modalities import ContentOptions
from transrec.data_shards.sequence_table import SequenceTable
from transrec.data_shards.shard_io import ItemStore, load_manifest
from transrec.trainer.core.checkpoint import DOMAIN_SPECIFIC, read_export_config, read_weights
from transrec.trainer.core.choices import ItemEncoder, Scorer
from transrec.trainer.core.feature_cache import FeatureCache, catalogue_chunks
from transrec.trainer.core.modalities import check_shards, content_options, use_export_files
from transrec.trainer.core.model import TransRec
from transrec.trainer.evaluation import ranking as ev


class ModelRanker:
    """`model` (a TransRec in eval mode for the duration of a call) ranked on `store`'s catalogue. `sequences`: the
    catalogue's users (a SequenceTable) for the tools that look users up (serving, batch recommend, the standalone
    evaluator); None in the trainer, which streams its evaluated users (eval_data.EvalStream). Users with NaN or
    infinite scores: `nonfinite` "raise" stops with ranking.NonFiniteScores naming `source` (the export); "worst"
    (the trainer's validation) records them as the worst rank."""

    def __init__(self, model, store, modality: np.ndarray, sequences, user_feature_names: list[str],
                 content_options: Callable[[], ContentOptions], device: torch.device, item_batch: int = 256,
                 user_batch: int = 256, precision: str = "fp32", nonfinite: str = "raise", source: str = "the model",
                 bounds: np.ndarray | None = None):
        self.model, self.store, self.modality, self.sequences = model, store, modality, sequences
        self.user_feature_names = user_feature_names
        self.content_options, self.device = content_options, device  # options made on first use (a decoder)
        self.item_batch, self.user_batch, self.precision = item_batch, user_batch, precision
        self.nonfinite, self.source = nonfinite, source
        self.bounds = bounds  # a mixture's catalogue item offsets: each user ranked among its own catalogue's items

    def needs_content(self) -> bool:
        cache = self.model.cache
        return any(not (cache and cache.covers(n)) for n in self.model.towers)

    @torch.no_grad()
    def item_vectors(self, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """[V, d] fp32: every catalogue item through its tower (cached lower blocks where the cache covers). A
        mixture's catalogues are encoded one after the other, in the chunks each would have alone, so that their
        vectors are those of the catalogue's own shards, bit for bit. `progress(items done)`: called after each
        chunk."""
        chunks = []
        all_items = np.arange(self.store.num_items)
        for start, stop in catalogue_chunks(all_items, self.bounds, self.item_batch):
            items = all_items[start:stop]
            content = None
            if self.model.towers and self.needs_content():
                content = load_item_content(self.store, items, self.content_options(), modality=self.modality)
                content = content.to(self.device, non_blocking=False)
            chunks.append(self.model.encode_items(torch.as_tensor(items, device=self.device), content).float())
            if progress is not None:
                progress(stop)
        return torch.cat(chunks)

    def user_feature_batch(self, chunk: ev.EvalUsers) -> dict[str, torch.Tensor] | None:
        """The chunk's user side features as padded id tensors; None when the model reads none."""
        if not self.model.side:
            return None
        out = {}
        for n in self.user_feature_names:
            if n not in chunk.features:
                raise ValueError(f"the evaluated users carry no user feature '{n}', which this model reads: build "
                                 "them with eval_users(..., feature_names=ranker.user_feature_names)")
            rows = [chunk.features[n][i].tolist() for i in range(len(chunk))]
            width = max(len(r) for r in rows)
            out[n] = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=self.device)
        return out

    @torch.no_grad()
    def user_vectors(self, item_vectors: torch.Tensor, hist: torch.Tensor, chunk: ev.EvalUsers | None = None
                     ) -> torch.Tensor:
        """[B, d] fp32: the model's user vector of each left-padded history `hist` [B, L] (item rows of
        `item_vectors`, -1 = padding), with the side features of `chunk`'s users when given."""
        mask = hist >= 0
        vecs = (item_vectors[hist.clamp(min=0)] * mask[..., None]).to(next(self.model.user_encoder.parameters()).dtype)
        feats = None if chunk is None else self.user_feature_batch(chunk)
        return self.model.user_vector(vecs, mask, feats).float()

    @contextmanager
    def eval_mode(self):
        """The model in eval mode inside the block (dropout off), in its former mode after."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def ranks(self, data: ev.EvalUsers | ev.EvalStream, scoring: str, exclude_seen: bool) -> np.ndarray:
        """Ranks of `data`'s targets; `scoring` "free_head" ranks with stage 1's head, "content" / "id" with
        user . item vector (the towers' content vectors, or the ID table's)."""
        with self.eval_mode():
            return self.ranks_in_eval_mode(data, scoring, exclude_seen)

    def ranks_in_eval_mode(self, data: ev.EvalUsers | ev.EvalStream, scoring: str, exclude_seen: bool,
                           item_vectors: torch.Tensor | None = None) -> np.ndarray:
        """ranks() with the model already in eval mode; `item_vectors`: this model's item_vectors(), when the caller
        has them already (else computed here)."""
        model, settle = self.model, {"nonfinite": self.nonfinite, "what": self.source, "bounds": self.bounds}
        iv = self.item_vectors() if item_vectors is None else item_vectors
        if scoring == Scorer.FREE_HEAD:
            dtype = next(model.user_encoder.parameters()).dtype

            def score(hist, chunk):
                mask = hist >= 0
                vecs = (iv[hist.clamp(min=0)] * mask[..., None]).to(dtype)
                h = model.encode_sequence(vecs, mask)[:, -1]
                h = model.with_user_features(h, self.user_feature_batch(chunk))
                return model.stage1_scores(h).float()

            return ev.rank_with_scores(score, self.store.num_items, data, exclude_seen, self.user_batch, self.device,
                                       **settle)
        return ev.rank_with_vectors(lambda hist, chunk: self.user_vectors(iv, hist, chunk), iv, data, exclude_seen,
                                    self.user_batch, precision=self.precision, **settle)


# -- the standalone evaluator ---------------------------------------------------------------------------------
def cache_frozen_blocks(ranker: ModelRanker, show_progress: bool = True, feature_store: str | Path | None = None,
                        log=None, every: float = 30.0) -> None:
    """The ranker's model's frozen lower blocks cached over its catalogue, as the run that made the export cached
    them (what makes its item vectors those of the run, bit for bit); progress lines through `log` when given."""
    ranker.model.cache = FeatureCache.build(ranker.model, ranker.store, ranker.store.modality, ranker.content_options(),
                                            ranker.device, show_progress=show_progress, store_dir=feature_store,
                                            log=log, progress_every=every)


def ranker_from_export(export_dir: Path, shards: Path, device: torch.device | str = "cpu",
                       show_progress: bool = True, build_cache: bool = True,
                       feature_store: str | Path | None = None, log=None) -> ModelRanker:
    """Rebuild the exported towers and user encoder (safetensors + JSON only) on `shards`' catalogue, its frozen
    blocks cached as the run that made the export cached them (`build_cache=False`: no cache, e.g. when the item
    vectors come from an index; `feature_store`: the folder of frozen-block outputs shared with training runs)."""
    export_dir, shards, device = Path(export_dir), Path(shards), torch.device(device)
    meta, cfg = read_export_config(export_dir)  # its files verified against their hashes, its settings valid
    use_export_files(cfg, export_dir, meta)  # the export's own files (a tokenizer, ...), not the training machine's
    if cfg.item_encoder != ItemEncoder.CONTENT:
        raise ValueError(f"{export_dir}: an ID model's export has no item table (catalogue-specific); it cannot score "
                         "items by content")
    if cfg.side_features:
        raise ValueError(f"{export_dir}: trained with side features, whose modules are catalogue-specific and not "
                         "exported; evaluate it inside its run (metrics.json) instead")
    manifest = load_manifest(shards)
    if manifest.get("catalogues"):
        names = ", ".join(c["source"] for c in manifest["catalogues"])
        raise ValueError(f"{shards} is a mixture of catalogues: score each catalogue's own shard folder ({names}); "
                         "a mixture run's figures per catalogue are in its catalogues.json")
    try:
        check_shards(manifest, cfg, meta)
    except ValueError as e:
        raise ValueError(f"{shards} for {export_dir}: {e}") from None
    store, sequences = ItemStore(shards), SequenceTable(shards)
    trainable = meta.get("trainable", {})  # the selected stage's split of each tower (absent: 0)
    model = TransRec(cfg, store.num_items, store.modality.copy(), trainable,
                     modality_names=store.modality_names).to(device)
    state = {k: v for k, v in read_weights(export_dir / "model.safetensors").items()
             if not k.startswith(DOMAIN_SPECIFIC)}
    missing = [k for k in model.state_dict() if k not in state and not k.startswith(DOMAIN_SPECIFIC)]
    if missing:
        raise ValueError(f"{export_dir}: {len(missing)} tensors of the model are missing from the export: "
                         f"{missing[:5]}")
    model.load_state_dict(state, strict=False)
    for name, tower in model.towers.items():
        tower.set_trainable(trainable.get(name, 0))
    model.eval()
    options = content_options(cfg, "auto", device)
    ranker = ModelRanker(model, store, store.modality, sequences, [], lambda: options, device,
                         source=f"the export {export_dir}")
    if build_cache:
        cache_frozen_blocks(ranker, show_progress, feature_store, log)
    return ranker
