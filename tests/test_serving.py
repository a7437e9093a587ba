"""Recommendations from an export: the Python API, the batch CLI (1 and 2 ranks), the item index and the HTTP
service agree; a catalogue the model never saw is encoded by content; new items are recommendable at once; bad
requests get a 4xx and the service keeps answering."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from transrec.data_shards.build import BuildOptions, build
from transrec.data_shards.integrity import IntegrityError
from transrec.data_shards.tables import GenericColumns, render_text
from transrec.trainer.core.checkpoint import save_export
from transrec.trainer.core.model import TransRec
from transrec.trainer.core.presets import preset
from transrec.trainer.evaluation.ranking import eval_users
from transrec.trainer.serving.recommender import Recommender, UnknownItems

REPO = Path(__file__).resolve().parent.parent
PICS = sorted((REPO / "data" / "hm-fashion-fixture" / "images").rglob("*.jpg"))
TEXTS = {"a": ("Red shoe", "A red leather shoe"), "b": ("Blue hat", "A wool hat"), "c": ("Green scarf", "Warm"),
         "d": ("Black boot", "Tall winter boot"), "e": ("White shirt", "Cotton shirt"), "f": ("Grey coat", "Long")}
LOG = [("u1", "a"), ("u1", "b"), ("u1", "c"), ("u1", "d"), ("u2", "b"), ("u2", "e"), ("u2", "f"), ("u2", "a"),
       ("u3", "f"), ("u3", "c"), ("u3", "e"), ("u4", "a"), ("u4", "d"), ("u4", "f"), ("u4", "b")]


def build_catalogue(root: Path, tiny_bert_dir: Path) -> Path:
    """A small generic catalogue (text and image items) no model was trained on, built under `root`."""
    src = root / "generic-src"
    (src / "pics").mkdir(parents=True)
    rows = []
    for n, (item, (title, blurb)) in enumerate(TEXTS.items()):
        pic = ""
        if n % 2:
            shutil.copyfile(PICS[n], src / "pics" / f"{item}.jpg")
            pic = f"pics/{item}.jpg"
        rows.append([item, title, blurb, pic])
    with open(src / "items.csv", "w", newline="") as f:
        csv.writer(f).writerows([["item_id", "title", "description", "image"], *rows])
    with open(src / "interactions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["user_id", "item_id", "timestamp"], *[(u, i, t) for t, (u, i) in enumerate(LOG)]])
    out = root / "generic" / "shards"
    build(BuildOptions(dataset="generic", source=src, out=out, tokenizer=str(tiny_bert_dir), max_tokens=16,
                       generic=GenericColumns()))
    return out


def build_export(out: Path, tiny_bert_dir: Path, nan_tower: str | None = None) -> Path:
    """An export of a tiny model (seeded random weights: these tests are about serving, not accuracy);
    `nan_tower`: that tower's last projection filled with NaN (a diverged model)."""
    torch.manual_seed(0)
    cfg = preset("tiny").model
    cfg.text.encoder = str(tiny_bert_dir)
    model = TransRec(cfg, 10, np.arange(10) % 2, {"text": 0, "image": 0})  # both towers
    for tower in model.towers.values():
        torch.nn.init.normal_(tower.proj[-1].weight, std=0.5)
    if nan_tower:
        with torch.no_grad():
            model.towers[nan_tower].proj[-1].weight.fill_(float("nan"))
    return save_export(model, cfg, out, {"trainable": {"text": 0, "image": 0}})


@contextmanager
def running(app) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port, in a thread; yields its URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    try:
        yield url
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def rec(export, catalogue) -> Recommender:
    return Recommender.from_export(export, catalogue, show_progress=False)


@pytest.fixture(scope="module")
def server(export, catalogue):
    """The service on a free loopback port, in a thread, with its own Recommender (POST /items changes it)."""
    from transrec.trainer.serving.app import create_app

    with running(create_app(Recommender.from_export(export, catalogue, show_progress=False))) as url:
        yield url


def _histories(catalogue: Path) -> dict[str, list[str]]:
    from transrec.data_shards.shard_io import read_sequences

    maps = json.loads((catalogue / "id_maps.json").read_text())
    return {s["raw_id"]: [maps["items"][i] for i in s["items"]] for s in read_sequences(catalogue)}


def test_api_batch_and_service_agree(rec, server, export, catalogue, tmp_path):
    from transrec.trainer.commands.recommend import main as batch_main

    out = tmp_path / "recs.jsonl"
    assert batch_main(["--export", str(export), "--shards", str(catalogue), "--k", "2", "--out", str(out)]) == 4
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    histories = _histories(catalogue)
    assert [r["user"] for r in lines] == list(histories)
    for line in lines:
        api = rec.recommend(histories[line["user"]], k=2)
        http = httpx.post(f"{server}/recommend", json={"history": histories[line["user"]], "k": 2}).json()
        assert line["items"] == api["items"] == http["items"] and len(api["items"]) == 2
        assert not set(api["items"]) & set(histories[line["user"]])  # seen items excluded
        np.testing.assert_allclose(line["scores"], api["scores"], rtol=1e-5)
    kept = rec.recommend(histories["u1"], k=6, exclude_seen=False)["items"]
    assert sorted(kept) == sorted(TEXTS)


def test_batch_over_two_ranks_equals_one(export, catalogue, tmp_path):
    """Under the deepspeed launcher (2 ranks on CPU) the parts are joined into the single-rank output."""
    from transrec.trainer.commands.recommend import main as batch_main

    one = tmp_path / "one.jsonl"
    batch_main(["--export", str(export), "--shards", str(catalogue), "--k", "3", "--out", str(one)])
    two = tmp_path / "two.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                        str(port), "--module", "transrec.trainer.commands.recommend", "--export", str(export),
                        "--shards", str(catalogue), "--k", "3", "--out", str(two), "--device", "cpu"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = ([json.loads(line) for line in f.read_text().splitlines()] for f in (one, two))
    assert [(x["user"], x["items"]) for x in a] == [(x["user"], x["items"]) for x in b] and len(a) == 4
    for x, y in zip(a, b):  # ranks run with one thread each: sums in another order
        np.testing.assert_allclose(x["scores"], y["scores"], rtol=1e-5)
    assert not list(tmp_path.glob("two.jsonl.rank*"))


def test_empty_history_unknown_ids_and_k(rec):
    pop = rec.recommend([], k=3)
    assert pop["items"][:2] == ["a", "b"] and "most popular" in pop["note"]  # 2 training interactions each
    assert pop["scores"] == sorted(pop["scores"], reverse=True)
    with pytest.raises(UnknownItems, match="'zz'"):
        rec.recommend(["zz"], k=2)
    mixed = rec.recommend(["zz", "a"], k=2)
    assert mixed["ignored"] == ["zz"] and len(mixed["items"]) == 2
    with pytest.raises(ValueError, match="k must be between 1 and the catalogue size"):
        rec.recommend(["a"], k=0)


def test_new_items_by_content(export, catalogue, tiny_bert_dir):
    """Cold start: an item's own text re-encoded gives its catalogue vector (the frozen blocks' output rounded as
    the feature cache stores it); its image likewise, up to the JPEG decoder; a new item is recommendable at once."""
    rec = Recommender.from_export(export, catalogue, show_progress=False)
    template = json.loads((catalogue / "manifest.json").read_text())["text"]["template"]
    text_item = next(i for i, m in zip(rec.item_ids, rec.ranker.store.modality) if m == 0)
    text = render_text(template, {"title": TEXTS[text_item][0], "description": TEXTS[text_item][1]})
    assert rec.add_item("copy-text", text=text) == "text"
    torch.testing.assert_close(rec.item_vectors[-1], rec.item_vectors[rec.index[text_item]], rtol=1e-5, atol=1e-5)
    image_item = next(i for i, m in zip(rec.item_ids, rec.ranker.store.modality) if m == 1)
    jpeg = bytes(rec.ranker.store.payload(rec.index[image_item], "image"))
    assert rec.add_item("copy-image", image_jpeg=jpeg) == "image"
    torch.testing.assert_close(rec.item_vectors[-1], rec.item_vectors[rec.index[image_item]], rtol=1e-3, atol=1e-3)
    items = rec.recommend(["a", "b"], k=len(rec.item_ids) - 2)["items"]
    assert "copy-text" in items and "copy-image" in items
    with pytest.raises(ValueError, match="already in the catalogue"):
        rec.add_item("a", text="x")
    with pytest.raises(ValueError, match="no content"):
        rec.add_item("empty", text="  ")


def test_service_bad_requests_get_4xx_and_it_keeps_running(server):
    cases = [
        (httpx.post(f"{server}/recommend", content=b"{not json", headers={"content-type": "application/json"}), 400,
         "JSON"),
        (httpx.post(f"{server}/recommend", json={"history": ["zz", "yy"], "k": 2}), 404, "'zz', 'yy'"),
        (httpx.post(f"{server}/recommend", json={"history": ["a"], "k": 0}), 422, "k:"),
        (httpx.post(f"{server}/recommend", json={"history": ["a"], "k": 500}), 422, "catalogue size"),
        (httpx.post(f"{server}/recommend", json={"history": "a"}), 422, "history"),
        (httpx.post(f"{server}/items", json={"id": "bad-img", "image_base64": base64.b64encode(b"no jpeg").decode()}),
         422, "JPEG"),
        (httpx.post(f"{server}/items", json={"id": "bad-b64", "image_base64": "%%%"}), 422, "base64"),
        (httpx.post(f"{server}/items", json={"id": "a", "text": "again"}), 409, "already in the catalogue"),
        (httpx.post(f"{server}/items", json={"id": "nothing"}), 422, "no content"),
    ]
    for response, status, needle in cases:
        assert response.status_code == status, (response.status_code, response.text)
        assert needle in response.json()["detail"], response.json()
    added = httpx.post(f"{server}/items", json={"id": "new-scarf", "text": "A soft red scarf"})
    assert added.status_code == 200 and added.json()["tower"] == "text"
    n = httpx.get(f"{server}/health").json()["items"]
    assert n == 7
    assert "new-scarf" in httpx.post(f"{server}/recommend", json={"history": ["a"], "k": n - 1}).json()["items"]


def test_index_recall_and_exact_search_equals_the_evaluator(rec, export, catalogue, tmp_path):
    from transrec.trainer.commands.index import main as index_main
    from transrec.trainer.evaluation.model_ranker import ranker_from_export
    from transrec.trainer.serving.item_index import recommender_from_index

    meta = index_main(["--export", str(export), "--shards", str(catalogue), "--out", str(tmp_path / "idx"), "--k", "3"])
    assert meta["kind"] == "faiss-hnsw-ip" and meta["recall_at_k"] == 1.0  # 6 items: the graph search is exhaustive
    assert (tmp_path / "idx" / "faiss.index").exists()
    served = recommender_from_index(tmp_path / "idx", export, catalogue)
    assert served.ann is not None
    for history in _histories(catalogue).values():
        assert served.recommend(history, k=3)["items"] == rec.recommend(history, k=3)["items"]
    # exact search ranks the evaluator's targets where the evaluator does
    ranker = ranker_from_export(export, catalogue, show_progress=False)
    data = eval_users(ranker.sequences, "test", rec.max_len)
    ranks = ranker.ranks(data, "content", exclude_seen=True)
    for row in range(len(data.users)):
        seen = [int(i) for i in data.seen[row] if i != data.targets[row]]
        history = [int(i) for i in data.histories[row] if i >= 0]
        scores, items = rec.top_k([history], len(rec.item_ids), exclude_seen=False)
        order = [i for i in items[0].tolist() if i not in seen]
        assert order.index(int(data.targets[row])) + 1 == ranks[row]


def test_index_without_faiss_is_exact(rec, export, catalogue, tmp_path, monkeypatch):
    from transrec.trainer.serving import item_index as index

    monkeypatch.setattr(index, "faiss_or_none", lambda: None)
    meta = index.write_index(rec, tmp_path / "idx", export, catalogue, k=3, n_queries=10)
    assert meta["kind"] == "exact" and "recall_at_k" not in meta and not (tmp_path / "idx" / "faiss.index").exists()
    served = index.recommender_from_index(tmp_path / "idx", export, catalogue)
    assert served.ann is None
    history = _histories(catalogue)["u2"]
    assert served.recommend(history, k=3) == rec.recommend(history, k=3)
    vectors = tmp_path / "idx" / "item_vectors.safetensors"  # one flipped bit in the index's vectors: named
    data = bytearray(vectors.read_bytes())
    data[-7] ^= 1
    vectors.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"index file .*item_vectors.safetensors differs from the sha256"):
        index.recommender_from_index(tmp_path / "idx", export, catalogue)


def test_micro_batching_gives_each_request_its_own_answer(export, catalogue):
    """Concurrent requests share model passes and still get exactly what one request alone gets."""
    from concurrent.futures import ThreadPoolExecutor

    from transrec.trainer.serving.recommender import MicroBatcher

    alone = Recommender.from_export(export, catalogue, show_progress=False)
    shared = Recommender.from_export(export, catalogue, show_progress=False)
    shared.batcher = MicroBatcher(shared, max_batch=64, max_wait_ms=50)
    histories = list(_histories(catalogue).values())
    asks = [(histories[i % 4][: 1 + i % 3], 1 + i % 5, i % 2 == 0) for i in range(48)]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda a: shared.recommend(*a), asks))
    for (history, k, exclude), answer in zip(asks, got):
        want = alone.recommend(history, k, exclude)
        assert answer["items"] == want["items"]
        np.testing.assert_allclose(answer["scores"], want["scores"], rtol=1e-5, atol=1e-6)
    assert shared.batcher.largest > 1 and shared.batcher.batches < len(asks)
