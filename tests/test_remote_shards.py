"""Shards over a URL: a shard folder served over HTTP on the loopback address is fetched once into a local cache,
verified against the manifest's hashes, and then trains like the folder itself; an altered file is refused by name."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading

import pytest

from transrec.data_shards.loader import LoaderConfig, make_train_loader
from transrec.data_shards.remote import localize, shard_files
from transrec.data_shards.shard_io import load_manifest


@pytest.fixture()
def served(ml_shards, tmp_path):
    """A copy of the test shards behind http://127.0.0.1:PORT/ml (a copy: a test alters it)."""
    root = tmp_path / "www"
    shutil.copytree(ml_shards, root / "ml")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ml", root / "ml"
    finally:
        server.shutdown()


def _batches(shards):
    loader = make_train_loader(shards, LoaderConfig(window=9, batch_size=64, stride=9, load_content=False))
    return [(b.users.tolist(), b.ends.tolist(), b.items.tolist()) for b in loader]


def test_url_shards_are_fetched_once_verified_and_train_like_the_folder(served, ml_shards, tmp_path):
    url, _ = served
    messages = []
    local = localize(url, root=tmp_path / "cache", log=messages.append)
    manifest = load_manifest(local)
    assert manifest == load_manifest(ml_shards)
    for name in shard_files(manifest):
        assert (local / name).read_bytes() == (ml_shards / name).read_bytes()
    assert f"{len(shard_files(manifest))} file(s) fetched" in messages[-1]
    assert _batches(local) == _batches(ml_shards)
    again = localize(url, root=tmp_path / "cache", log=messages.append)  # filled once: nothing fetched again
    assert again == local and "0 file(s) fetched" in messages[-1]
    (local / "item_index.npy").write_bytes(b"truncated")  # a damaged cached copy is fetched again
    localize(url, root=tmp_path / "cache", log=messages.append)
    assert "1 file(s) fetched" in messages[-1]
    assert (local / "item_index.npy").read_bytes() == (ml_shards / "item_index.npy").read_bytes()


def test_an_altered_served_file_is_refused_by_name(served, tmp_path):
    url, folder = served
    name = load_manifest(folder)["shards"]["sequences"][0]
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=f"{name}: sha256 differs"):
        localize(url, root=tmp_path / "cache", log=lambda m: None)
    assert not list((tmp_path / "cache").glob("*/manifest.json"))  # no folder looks complete


def test_shards_without_hashes_and_missing_servers_say_what_to_do(served, tmp_path):
    import json

    url, folder = served
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("file_sha256")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match="rebuild the shards"):
        localize(url, root=tmp_path / "cache", log=lambda m: None)
    with pytest.raises(RuntimeError, match="127.0.0.1:9/nothing/manifest.json"):
        localize("http://127.0.0.1:9/nothing", root=tmp_path / "cache", log=lambda m: None)
    assert localize(str(folder)) == folder  # a local path is used as it is
