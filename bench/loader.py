"""Input-pipeline bench: image decoding alone, then sequences/s through the training loader.

    python bench/loader.py --shards shards/hm-fashion-image --decoder all --workers 0,2 --json out.json

1. Decode only: the JPEGs of every image item (read once from the ItemStore, not timed) are decoded in
   batches of --batch-size with each decoder (--decoder all: pil, torchvision, dali where available), after
   one warm-up batch (pipeline build, imports). On CUDA the clock stops after a synchronisation.
2. Loader: when data_shards.loader exposes make_train_loader, sequences/s over --batches batches (after one
   warm-up batch) for each --workers count. On CPU the workers decode (decode_in_loader); on CUDA the
   loader hands JPEG bytes over and the main process decodes on the GPU, as trainer/training/loop.py does.

Prints a Markdown table and writes the rows as JSON (--json): decoder, backend, device, workers,
images_decoded, images_per_s, sequences_per_s (workers and sequences_per_s are null for decode-only rows).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:  # before any other import: this folder off sys.path (trainer/commands/script_path.py)
    from transrec.trainer.commands.script_path import run_as_script
except ModuleNotFoundError:
    raise SystemExit("error: transrec is not installed in this Python: `make install` or `pip install -e .`") from None
run_as_script(__file__, offline=True)

import torch

from transrec.data_shards.decode import ImageDecoder, resolve_backend
from transrec.data_shards.decode_dali import dali_import_error
from transrec.data_shards.modalities import ContentSettings, ImageSettings
from transrec.data_shards.shard_io import ItemStore

COLUMNS = ("decoder", "backend", "device", "workers", "images_decoded", "images_per_s", "sequences_per_s")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decoders_to_run(name: str) -> list[str]:
    if name != "all":
        return [name]
    return ["pil", "torchvision"] + ([] if dali_import_error() else ["dali"])


def bench_decode(store: ItemStore, decoder: str, device: torch.device, size: int, batch_size: int,
                 max_batches: int | None, threads: int) -> dict:
    """Images/s of ImageDecoder.decode over all image items of the shards (cache off)."""
    items = [i for i in range(store.num_items) if store.index["image_size"][i] > 0]
    if not items:
        raise SystemExit(f"{store.shard_dir} holds no images: build shards with --modality image or mixed")
    jpegs = [bytes(store.payload(i, "image")) for i in items]
    batches = [(jpegs[s : s + batch_size], items[s : s + batch_size]) for s in range(0, len(items), batch_size)]
    if max_batches:
        batches = batches[:max_batches]
    dec = ImageDecoder(decoder, size=size, device=device, max_batch_size=batch_size, num_threads=threads)
    dec.decode(*batches[0])  # warm-up: imports, DALI pipeline build, CUDA context
    sync(device)
    before = dec.images_decoded
    start = time.perf_counter()
    for jp, ids in batches:
        out = dec.decode(jp, ids)
    sync(device)
    seconds = time.perf_counter() - start
    assert out.shape[1:] == (3, size, size)
    n = dec.images_decoded - before
    return {"decoder": decoder, "backend": dec.backend, "device": str(device), "workers": None,
            "images_decoded": n, "images_per_s": n / seconds, "sequences_per_s": None}


def bench_loader(shards: Path, decoder: str, device: torch.device, size: int, workers: int, batches: int,
                 seq_batch: int) -> dict:
    """Sequences/s through data_shards.loader.make_train_loader, images decoded on the way."""
    loader_mod = importlib.import_module("transrec.data_shards.loader")
    on_gpu = device.type == "cuda"
    content = ContentSettings({"image": ImageSettings(size=size, backend=decoder)})
    cfg = loader_mod.LoaderConfig(batch_size=seq_batch, num_workers=workers, content=content,
                                  decode_in_loader=not on_gpu)
    loader = loader_mod.make_train_loader(shards, cfg)
    gpu_decoder = ImageDecoder(decoder, size=size, device=device) if on_gpu else None
    sequences = images = 0
    start = None
    for k, batch in enumerate(loader):
        c = batch.content
        if gpu_decoder is not None and c is not None and "image" in c.payloads:
            c.inputs["image"] = {"pixels": gpu_decoder.decode(c.payloads.pop("image"),
                                                              batch.unique_items[c.rows["image"]].tolist())}
        if k == 0:  # warm-up batch: worker start, imports, pipeline builds
            sync(device)
            start = time.perf_counter()
            continue
        sequences += int(batch.items.shape[0])
        images += 0 if c is None or "image" not in c.rows else len(c.rows["image"])
        if k == batches:
            break
    sync(device)
    seconds = time.perf_counter() - start if start is not None else float("nan")
    if sequences == 0:
        raise SystemExit(f"the loader gave fewer than 2 batches of {seq_batch}: lower --seq-batch")
    return {"decoder": decoder, "backend": resolve_backend(decoder, device if on_gpu else "cpu"),
            "device": str(device), "workers": workers, "images_decoded": images,
            "images_per_s": images / seconds, "sequences_per_s": sequences / seconds}


def markdown(rows: list[dict]) -> str:
    def fmt(v) -> str:
        if v is None:
            return "-"
        return f"{v:,.0f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, required=True, help="shard folder (python -m transrec.data_shards.build)")
    p.add_argument("--decoder", default="auto", choices=["auto", "dali", "torchvision", "pil", "all"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", default="0", help="comma-separated loader worker counts, e.g. 0,2,4")
    p.add_argument("--batches", type=int, default=20, help="loader batches measured (after one warm-up)")
    p.add_argument("--decode-batches", type=int, default=0, help="decode batches measured (0: every image once)")
    p.add_argument("--batch-size", type=int, default=256, help="images per decode call")
    p.add_argument("--seq-batch", type=int, default=128, help="sequences per loader batch")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="ImageDecoder num_threads for the decode-only rows")
    p.add_argument("--no-loader", action="store_true", help="decode-only rows")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    store = ItemStore(a.shards)
    names = decoders_to_run(a.decoder)

    rows = []
    for name in names:
        rows.append(bench_decode(store, name, device, a.size, a.batch_size, a.decode_batches or None, a.threads))
        print(f"decode {name}: {rows[-1]['images_per_s']:,.0f} images/s", file=sys.stderr)
    spec = importlib.util.find_spec("transrec.data_shards.loader")
    loader_module = importlib.import_module("transrec.data_shards.loader") if spec is not None else None
    has_loader = hasattr(loader_module, "make_train_loader")
    if a.no_loader:
        pass
    elif not has_loader:
        print("data_shards.loader.make_train_loader not found: loader rows skipped", file=sys.stderr)
    else:
        for name in names:
            for workers in (int(w) for w in a.workers.split(",")):
                rows.append(bench_loader(a.shards, name, device, a.size, workers, a.batches, a.seq_batch))
                print(f"loader {name} workers {workers}: {rows[-1]['sequences_per_s']:,.0f} sequences/s",
                      file=sys.stderr)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}"
    print(f"\n{store.shard_dir} | {dev_name} | torch {torch.__version__} | size {a.size}\n")
    print(markdown(rows))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
