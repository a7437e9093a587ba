"""An item index of a catalogue: content vectors (safetensors) + raw ids, and an approximate index when FAISS is
installed, with its recall@K against exact search measured and recorded.

Written by `python -m transrec.trainer.commands.index --export DIR --shards DIR --out DIR` (trainer/commands/index.py):
OUT/item_vectors.safetensors ("vectors" [V, d] fp32), OUT/index.json (raw ids, the export and shards it was made
from, the approximate index's kind and recall@K), OUT/faiss.index (FAISS HNSW over inner products) when FAISS is
importable, and OUT/files.sha256.json (each file's sha256, checked before the index is read).
`python -m transrec.trainer.commands.serve --index OUT` serves from it without encoding the catalogue again; exact
search (one matrix product) is the fallback and the reference the recall is measured against.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from transrec.trainer.core.checkpoint import read_weights, verify_hashes, write_checkpoint_hashes
from transrec.trainer.evaluation.model_ranker import ranker_from_export
from transrec.trainer.evaluation.ranking import eval_users
from transrec.trainer.serving.recommender import Recommender


def faiss_or_none():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def build_ann(vectors: np.ndarray):
    """FAISS HNSW over inner products (user . item scores), or None without FAISS."""
    faiss = faiss_or_none()
    if faiss is None:
        return None
    faiss.omp_set_num_threads(1)  # deterministic graph construction
    index = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction, index.hnsw.efSearch = 80, 128
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def recall_at_k(rec: Recommender, ann, queries: np.ndarray, k: int) -> float:
    """Mean |approximate top-k ∩ exact top-k| / k over user vectors `queries` [Q, d] (no item excluded)."""
    exact = torch.topk(torch.as_tensor(queries) @ rec.item_vectors.cpu().T, k, dim=1).indices.numpy()
    _, approx = ann.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)]))


def write_index(rec: Recommender, out: Path, export: Path, shards: Path, k: int, n_queries: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    save_file({"vectors": rec.item_vectors.cpu().contiguous()}, str(out / "item_vectors.safetensors"))
    meta = {"items": rec.item_ids, "export": str(export), "shards": str(shards),
            "shards_inputs": rec.manifest["input_files"], "d": int(rec.item_vectors.shape[1]), "kind": "exact"}
    ann = build_ann(rec.item_vectors.cpu().numpy())
    if ann is not None:
        import faiss

        faiss.write_index(ann, str(out / "faiss.index"))
        data = eval_users(rec.ranker.sequences, "test", rec.max_len)
        users = data.histories[: n_queries]
        queries = rec.user_vectors([[int(i) for i in h if i >= 0] for h in users]).cpu().numpy()
        meta.update(kind="faiss-hnsw-ip", k=k, queries=len(queries),
                    recall_at_k=recall_at_k(rec, ann, queries, min(k, len(rec.item_ids))))
    (out / "index.json").write_text(json.dumps(meta, indent=1))
    write_checkpoint_hashes(out)  # the service verifies the index's files before reading them
    return meta


def recommender_from_index(index_dir: Path, export: Path, shards: Path, device: str = "cpu") -> Recommender:
    """A Recommender whose item vectors come from an index (no catalogue encoding); FAISS search when present. Its
    files are verified against the hashes written with it first."""
    if not (index_dir / "index.json").is_file():
        raise FileNotFoundError(f"{index_dir} is not an index (no index.json): build one with "
                                "`python -m transrec.trainer.commands.index`")
    verify_hashes(index_dir, "index", "rebuild it with `python -m transrec.trainer.commands.index`")
    meta = json.loads((index_dir / "index.json").read_text())
    ranker = ranker_from_export(export, shards, device, show_progress=False, build_cache=False)
    vectors = read_weights(index_dir / "item_vectors.safetensors")["vectors"].to(ranker.device)
    rec = Recommender(ranker, vectors)
    if meta["items"] != rec.item_ids or meta["shards_inputs"] != rec.manifest["input_files"]:
        raise ValueError(f"the index {index_dir} was made from other shards than {shards}: rebuild it with "
                         "`python -m transrec.trainer.commands.index`")
    faiss = faiss_or_none()
    if faiss is not None and (index_dir / "faiss.index").exists():
        rec.ann = faiss.read_index(str(index_dir / "faiss.index"))
    return rec
