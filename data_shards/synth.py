"""Synthetic data at any scale, in the normal shard format, declared synthetic in its manifest.

    python -m transrec.data_shards.synth --users N --items M [--mean-length L] [--zipf A] [--images K] [--seed S]
        --out DIR

Items: a random title and description of words drawn from a fixed vocabulary, and one of K small random JPEGs (64
px), so the mixed-modality rule routes about half of them to each tower; item popularity follows a Zipf law of
exponent A over a random permutation of the items. Users: sequence lengths 3 + a geometric draw (mean L overall);
items drawn by popularity, timestamps increasing. The raw tables are written as a generic dataset next to the output
and built by `data_shards.build --dataset generic`, so the shards go through the same validation and writer as real
data (the manifest lists every file's sha256 in `file_sha256`, which readers verify). For measuring scale, never for
accuracy claims: the manifest's "provenance" says "synthetic" with every parameter.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from transrec.data_shards.build import BuildOptions, build

WORDS = [
    "red", "blue", "green", "black", "white", "grey", "soft", "warm", "light", "long", "short", "classic",
    "cotton", "wool", "leather", "linen", "silk", "denim", "summer", "winter", "autumn", "spring", "jacket",
    "shirt", "dress", "skirt", "shoe", "boot", "hat", "scarf", "coat", "sweater", "trouser", "bag", "belt",
    "film", "drama", "comedy", "thriller", "story", "family", "war", "love", "space", "future", "city", "night",
    "river", "road", "music", "dance",
]


def random_jpegs(k: int, rng: np.random.Generator, size: int = 64) -> list[bytes]:
    out = []
    for _ in range(k):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def write_raw(root: Path, users: int, items: int, mean_length: float, zipf: float, images: int, seed: int) -> int:
    """The generic tables (interactions.csv, items.csv) and images/ under `root`; returns the interaction count."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    for k, jpeg in enumerate(random_jpegs(images, rng)):
        (root / "images" / f"{k}.jpg").write_bytes(jpeg)
    words = np.array(WORDS)
    with open(root / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "description", "image"])
        for start in range(0, items, 100_000):
            n = min(100_000, items - start)
            titles = rng.choice(words, size=(n, 3))
            descs = rng.choice(words, size=(n, 8))
            pics = rng.integers(0, images, size=n)
            w.writerows([f"i{start + r}", " ".join(titles[r]), " ".join(descs[r]), f"images/{pics[r]}.jpg"]
                        for r in range(n))
    weights = 1.0 / np.arange(1, items + 1) ** zipf
    popularity = np.empty(items)
    popularity[rng.permutation(items)] = weights / weights.sum()
    cumulative = np.cumsum(popularity)
    total = 0
    with open(root / "interactions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        for start in range(0, users, 10_000):
            n = min(10_000, users - start)
            lengths = 3 + rng.geometric(1.0 / max(mean_length - 2.0, 1.0), size=n) - 1
            picks = np.searchsorted(cumulative, rng.random(int(lengths.sum())) * cumulative[-1])
            picks = np.minimum(picks, items - 1)
            offset = 0
            for r, length in enumerate(lengths):
                u = f"u{start + r}"
                w.writerows([u, f"i{picks[offset + t]}", 1_600_000_000 + t] for t in range(length))
                offset += length
            total += int(lengths.sum())
    return total


def synthesize(out: Path, users: int, items: int, mean_length: float = 20.0, zipf: float = 1.1, images: int = 64,
               seed: int = 0, tokenizer: str | None = None, keep_raw: bool = False) -> dict:
    """Write the synthetic tables beside `out` (OUT.raw), build them into shards at `out`; returns the manifest."""
    if users < 1 or items < 2 or mean_length < 3 or images < 1:
        raise ValueError("need users >= 1, items >= 2, mean_length >= 3 and images >= 1")
    raw = out.with_name(out.name + ".raw")
    params = {"users": users, "items": items, "mean_length": mean_length, "zipf": zipf, "images": images, "seed": seed}
    interactions = write_raw(raw, users, items, mean_length, zipf, images, seed)
    manifest = build(BuildOptions(dataset="generic", source=raw, out=out, tokenizer=tokenizer,
                                  items_per_shard=max(2000, items // 64), users_per_shard=max(1000, users // 64),
                                  provenance={"kind": "synthetic", "generator": "data_shards.synth", **params,
                                              "interactions_drawn": interactions}))
    if not keep_raw:
        shutil.rmtree(raw)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m transrec.data_shards.synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--items", type=int, required=True)
    p.add_argument("--mean-length", type=float, default=20.0, help="mean interactions per user (>= 3)")
    p.add_argument("--zipf", type=float, default=1.1, help="exponent of the item popularity law")
    p.add_argument("--images", type=int, default=64, help="distinct random JPEGs shared by the image items")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", default=None, help="local tokenizer folder (default: all-MiniLM-L6-v2's)")
    p.add_argument("--keep-raw", action="store_true", help="keep the generic tables next to the output")
    a = p.parse_args(argv)
    if a.users < 1 or a.items < 2 or a.mean_length < 3 or a.images < 1:
        p.error("need --users >= 1, --items >= 2, --mean-length >= 3 and --images >= 1")
    return synthesize(a.out, a.users, a.items, a.mean_length, a.zipf, a.images, a.seed, a.tokenizer, a.keep_raw)


if __name__ == "__main__":
    main()
