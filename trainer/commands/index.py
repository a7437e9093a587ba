"""Command: an item index of a catalogue: content vectors (safetensors) + raw ids, and an approximate index when
FAISS is installed, with its recall@K against exact search measured and recorded (trainer/serving/item_index.py).

    python -m transrec.trainer.commands.index --export DIR --shards DIR --out DIR [--k 10] [--queries 1000]

OUT/item_vectors.safetensors ("vectors" [V, d] fp32), OUT/index.json (raw ids, the export and shards it was made
from, the approximate index's kind and recall@K), OUT/faiss.index (FAISS HNSW over inner products) when FAISS is
importable, and OUT/files.sha256.json (each file's sha256, checked before the index is read).
`python -m transrec.trainer.commands.serve --index OUT` serves from it without encoding the catalogue again; exact
search (one matrix product) is the fallback and the reference the recall is measured against.
"""

from __future__ import annotations

from pathlib import Path

from transrec.data_shards.integrity import IntegrityError
from transrec.trainer.commands.export_args import export_cli
from transrec.trainer.serving.item_index import write_index
from transrec.trainer.serving.recommender import (
    Recommender,
)


def main(argv: list[str] | None = None) -> dict:
    p = export_cli("python -m transrec.trainer.commands.index", __doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=10, help="recall@K of the approximate index (default 10)")
    p.add_argument("--queries", type=int, default=1000, help="user vectors used to measure recall (test users)")
    a = p.parse_args(argv)
    try:
        rec = Recommender.from_export(a.export, a.shards, a.device)
    except (FileNotFoundError, ValueError, IntegrityError) as e:
        raise SystemExit(f"error: {e}") from None
    if rec.unusable:  # NaN or infinite item vectors: an index of them would rank nothing
        raise SystemExit(f"error: {rec.unusable}")
    meta = write_index(rec, Path(a.out), Path(a.export), Path(a.shards), a.k, a.queries)
    extra = (f"; {meta['kind']} recall@{meta['k']} {meta['recall_at_k']:.4f} over {meta['queries']} test users"
             if "recall_at_k" in meta else "; FAISS not installed: exact search only")
    print(f"index of {len(meta['items'])} items written to {a.out}{extra}")
    return meta


if __name__ == "__main__":
    main()
