"""A catalogue's item vectors under an export, kept across `evaluate` calls (trainer/evaluation/export_on_catalogue.py).

Encoding a catalogue is most of an evaluation's time (about 100 s for 10k items on 2 CPU cores), and the vectors
depend only on the export's weights and the catalogue's files, so the first call stores them and later calls of the
same export on the same shards read them. The key hashes everything they depend on: the export's files.sha256.json
(verified against the files when the export loads, before this runs), the shards' manifest with its file_sha256
(verified by load_manifest), the device type, the item batch, the torch version and this file's format. A changed
weight, a rebuilt catalogue or another device gives another key; nothing is read from a file written under another
key.

Stored as in the feature store (`.feature_cache/` beside the shard folder, or the folder given;
trainer/core/feature_cache.py resolve_store), as `item-vectors-<key>.safetensors`: the vectors with the hash of the
file's tensors and the key in its metadata, written to a temporary name and renamed into place, so a kill leaves the old
file or the new one. A file whose tensors differ from their recorded hash (altered, truncated), whose key or shape
differ, or that cannot be read is ignored with one warning and written again (as the shard verification record is,
data_shards/integrity.py). Exports written before files.sha256.json existed, and shards without file_sha256, are not
cached (nothing verified to key them by).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from transrec.data_shards.integrity import IntegrityError
from transrec.trainer.core.checkpoint import CHECKPOINT_HASHES, TENSORS_SHA256, read_weights, tensors_sha256
from transrec.trainer.core.feature_cache import ProgressLog, resolve_store
from transrec.trainer.evaluation.model_ranker import cache_frozen_blocks

VECTORS_FORMAT = 1
KEY = "transrec_item_vectors_key"  # safetensors metadata: the key the vectors were stored under


def stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def vectors_key(export_dir: Path, manifest: dict, device: torch.device, item_batch: int) -> str | None:
    """The hash of what the catalogue's item vectors depend on; None when the export or the shards carry no hashes."""
    listed = Path(export_dir) / CHECKPOINT_HASHES
    if not listed.is_file() or not manifest.get("file_sha256"):
        return None
    meta = {"format": VECTORS_FORMAT, "export": json.loads(listed.read_text()),
            "shards": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
            "device": torch.device(device).type, "item_batch": item_batch, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]


def vectors_path(store: Path, key: str) -> Path:
    return Path(store) / f"item-vectors-{key}.safetensors"


def read_vectors(path: Path, key: str, num_items: int, log=stderr_line) -> torch.Tensor | None:
    """The stored vectors when `path` holds them under `key` for `num_items` items, verified against the hash of its
    tensors; None when there is no file, or (with one warning) when it fails a check."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            stored_key = (f.metadata() or {}).get(KEY)
        if stored_key != key:
            raise IntegrityError(f"stored under key {stored_key}, not {key}")
        vectors = read_weights(path)["vectors"]  # its tensors against the hash recorded in the file
        if vectors.ndim != 2 or len(vectors) != num_items:
            raise IntegrityError(f"{tuple(vectors.shape)} vectors for {num_items} items")
    except (IntegrityError, SafetensorError, OSError, KeyError) as e:
        log(f"warning: ignoring the item-vector cache {path} ({str(e).splitlines()[0]}): encoding the catalogue "
            "again and replacing it")
        return None
    return vectors


def write_vectors(path: Path, key: str, vectors: torch.Tensor, log=stderr_line) -> bool:
    """Store `vectors` at `path` atomically (temporary name, then rename); False (one warning) when it cannot."""
    state = {"vectors": vectors.detach().float().cpu().contiguous()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(tmp), metadata={TENSORS_SHA256: tensors_sha256(state), KEY: key})
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log(f"warning: could not store the item vectors at {path} ({e}): the next evaluation encodes the catalogue "
            "again; give --vector-cache a writable folder")
        return False
    return True


def encode_with_progress(ranker, log=stderr_line, every: float = 10.0) -> torch.Tensor:
    """ranker.item_vectors() (frozen blocks cached first, as the run that made the export cached them), with a line
    at the start, one every `every` seconds (items encoded, rate, time left) and one at the end, on any stream."""

    n = ranker.store.num_items
    log(f"encoding the catalogue's {n} items (once: later evaluations of this export on these shards read them)")
    t0 = time.perf_counter()
    cache_frozen_blocks(ranker, log=log, every=every)
    progress = ProgressLog("item vectors", n, log, every=every)
    with ranker.eval_mode():
        vectors = ranker.item_vectors(progress=progress.update)
    seconds = time.perf_counter() - t0
    log(f"encoded {n} items in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} items/s)")
    return vectors


def cached_item_vectors(ranker, export_dir: Path, shards: Path, store: str | None = "auto",
                        log=stderr_line) -> torch.Tensor:
    """The catalogue's item vectors under `ranker`'s model: read from the store when stored under the same key,
    else encoded (with progress lines) and stored. `store`: "auto" (`.feature_cache/` beside the shards), a folder,
    or None / "none" (encode every time)."""
    folder = resolve_store(store, shards)
    key = vectors_key(export_dir, ranker.store.manifest, ranker.device, ranker.item_batch)
    path = None if folder is None or key is None else vectors_path(folder, key)
    if path is not None:
        t0 = time.perf_counter()
        vectors = read_vectors(path, key, ranker.store.num_items, log)
        if vectors is not None:
            log(f"item vectors of {len(vectors)} items read from {path} in {time.perf_counter() - t0:.1f} s")
            return vectors.to(ranker.device)
    vectors = encode_with_progress(ranker, log)
    if path is not None and write_vectors(path, key, vectors, log):
        log(f"item vectors stored at {path}")
    return vectors
