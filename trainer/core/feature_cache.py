"""Cache of the frozen lower blocks' outputs, computed once per item.

Frozen lower blocks of a tower depend only on the item, so their output is computed in one pass over the
catalogue and stored (half precision by default); training then runs only the trainable top from the cache.
Nothing learned changes: the frozen blocks would compute the same values every step. A tower that trains
every block (trainable = -1) is not cached and reads content from the loader.

With a `store_dir` (config `data.feature_store`), each tower's table is also kept on disk and reused by later runs,
keyed by everything the values depend on: the exact weights of the frozen blocks (hashed), which blocks they are,
the shards (manifest), the items routed to the tower, what its modality's collated inputs depend on (its content
kind's `identity`: the token budget; the pixel size and the image decoder; ...) and the storage dtype. Runs that
share frozen blocks (every scratch seed; transfer, whose lower blocks were never trained in the source) skip the
pass; any changed weight gives a new key. Files are written atomically (temporary name, rename). The default,
`data.feature_store=auto`, is `.feature_cache/` beside the shard folder (none if it cannot be written): the pass
costs time linear in the catalogue (about 7 ms an item on 2 CPU cores), so a second run, or the same stage of
another seed, on a large catalogue starts at once. `none` turns the store off.

Given a log, the pass logs its progress (items, rate, time left) every 30 seconds, on a terminal (beside the bar) or
not.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from transrec.data_shards.batch import load_item_content
from transrec.data_shards.mixture import catalogue_bounds
from transrec.data_shards.modalities import ContentOptions
from transrec.data_shards.shard_io import ItemStore
from transrec.trainer.core.progress import ProgressLog  # noqa: F401  (re-exported: its former home)
from transrec.trainer.core.timing_hook import span


def catalogue_chunks(items: np.ndarray, bounds: np.ndarray | None, chunk: int) -> list[tuple[int, int]]:
    """(start, stop) positions in the sorted `items` of chunks of at most `chunk`; a mixture's catalogues (`bounds`)
    each start a chunk, so that each catalogue's items are batched as in its own shards (the same padding, the same
    features bit for bit)."""
    cuts = [0, len(items)] if bounds is None else [0, *np.searchsorted(items, bounds[1:-1]).tolist(), len(items)]
    return [(s, min(s + chunk, b)) for a, b in zip(cuts[:-1], cuts[1:]) for s in range(a, b, chunk)]


class FeatureCache:
    """Per cached tower (modality name), its lower blocks' features of every item routed to it: named tensors whose
    rows are the items in id order (`rows` maps an item id to its row in its modality's tables)."""

    def __init__(self, features: dict[str, dict[str, torch.Tensor]], rows: torch.Tensor, covered: set[str],
                 computed_s: float = 0.0):
        self._features, self._rows, self._covered = features, rows, covered
        self.computed_s = computed_s  # seconds spent computing features (0 when every table came from the store)
        stored = [t for f in features.values() for t in f.values() if t.is_floating_point()]
        self.dtype = stored[0].dtype if stored else torch.float16  # precision of the stored features

    def covers(self, modality: str) -> bool:
        return modality in self._covered

    @property
    def covered(self) -> frozenset[str]:
        """The modalities whose frozen blocks are cached."""
        return frozenset(self._covered)

    def features(self, modality: str, items: torch.Tensor) -> dict[str, torch.Tensor]:
        r = self._rows[items.to(self._rows.device)]
        return {k: t[r].to(items.device) for k, t in self._features[modality].items()}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in self._features.values() for t in f.values())

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model,
        store: ItemStore,
        modality: np.ndarray,
        options: ContentOptions,
        device: torch.device,
        chunk: int = 256,
        dtype: torch.dtype = torch.float16,
        show_progress: bool = True,
        store_dir: str | Path | None = None,
        log=None,
        progress_every: float = 30.0,
    ) -> FeatureCache | None:
        """Lower-block outputs for every item of each cached tower (rows indexed per modality); with `show_progress`,
        a bar on a terminal and, given `log`, a progress line every `progress_every` seconds on any stream."""
        towers = model.towers
        covered = {name for name, t in towers.items() if t.trainable < t.num_blocks}
        if not covered:
            return None
        rows = torch.full((store.num_items,), -1, dtype=torch.long)
        features: dict[str, dict[str, torch.Tensor]] = {}
        computed_s = 0.0
        was_training = model.training
        model.eval()
        for m, name in enumerate(model.modality_names):
            items = np.flatnonzero(modality == m)
            if name not in covered or len(items) == 0:  # not cached, or no item routed to it (one-modality shards)
                continue
            rows[torch.from_numpy(items)] = torch.arange(len(items))
            path = None
            if store_dir is not None:
                key = feature_key(towers[name], store, items, options.identity(name), dtype)
                path = Path(store_dir) / f"{name}-{key}.pt"
                if path.exists():
                    features[name] = torch.load(path, weights_only=True)
                    if log is not None:
                        log(f"{name} features: reused {path}")
                    continue
            t0 = time.perf_counter()
            progress = ProgressLog(f"caching {name} features", len(items), log if show_progress else None,
                                   every=progress_every)
            features[name] = lower_block_features(model, name, store, items, options, device, chunk, dtype, progress,
                                                  bar=show_progress and sys.stderr.isatty())
            computed_s += time.perf_counter() - t0
            if path is not None:
                store_features(name, features[name], path, log)
        model.train(was_training)
        # Kept on the training device (GPU gathers are cheap); on CPU this is a no-op.
        features = {n: {k: t.to(device) for k, t in f.items()} for n, f in features.items()}
        return cls(features, rows.to(device), covered, computed_s)


def lower_block_features(model, name: str, store: ItemStore, items: np.ndarray, options: ContentOptions,
                         device: torch.device, chunk: int, dtype: torch.dtype, progress: ProgressLog,
                         bar: bool) -> dict[str, torch.Tensor]:
    """The lower blocks' outputs of tower `name` for `items` (sorted ids routed to it), in chunks (a mixture's
    catalogues each start one: catalogue_chunks), stored in `dtype` on the CPU; `bar`: a tqdm bar (carriage returns
    only on a terminal)."""
    tower, code = model.towers[name], model.modality_names.index(name)
    tower_dtype = next(tower.parameters()).dtype
    chunks = []
    for start, stop in tqdm(catalogue_chunks(items, catalogue_bounds(store.manifest), chunk),
                            desc=f"caching {name} features", unit="chunk", disable=not bar):
        progress.update(start)
        content = load_item_content(store, items[start:stop], options, modality=np.full(store.num_items, code))
        inputs = {k: v.to(device, tower_dtype) if v.is_floating_point() else v.to(device)
                  for k, v in content.inputs[name].items()}
        with span(model, f"{name} lower blocks"):
            lower = tower.lower(inputs)
        chunks.append({k: (v.to(dtype) if v.is_floating_point() else v).cpu() for k, v in lower.items()})
    return tower.stack(chunks)


def store_features(name: str, features: dict[str, torch.Tensor], path: Path, log=None) -> None:
    """Tower `name`'s feature table written to the store atomically (a temporary name, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(features, tmp)
    os.replace(tmp, path)
    if log is not None:
        log(f"{name} features: stored {path}")


def resolve_store(setting: str | None, shards: str | Path) -> Path | None:
    """The folder of `data.feature_store`: a path, None (off), or "auto" = `.feature_cache/` beside the shard folder
    when it can be written (None otherwise: the pass then runs every time)."""
    if setting is None or setting == "none":
        return None
    if setting != "auto":
        return Path(setting)
    folder = Path(shards).resolve().parent / ".feature_cache"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return None
    return folder


def feature_key(tower, store: ItemStore, items: np.ndarray, content_identity: dict, dtype: torch.dtype) -> str:
    """Hash of everything a tower's cached lower-block outputs depend on (see the module docstring);
    `content_identity`: what its modality's collated inputs depend on (ContentOptions.identity)."""
    h = hashlib.sha256()
    meta = {"tower": type(tower).__name__, "split": tower.split, **content_identity,
            "dtype": str(dtype), "manifest": json.dumps(store.manifest, sort_keys=True)}
    h.update(json.dumps(meta, sort_keys=True).encode())
    h.update(np.ascontiguousarray(items, dtype=np.int64).tobytes())
    for name, t in sorted(tower.lower_state().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]
