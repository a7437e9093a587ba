"""Shards over URLs: a shard folder served over http(s) (or any scheme fsspec has a backend for) is copied once into
a local cache and verified against its manifest; everything else reads the local copy.

    local = localize("https://host/path/shards-folder")      # a Path; a local folder is returned as it is

Why a copy: the item store reads item content by offset (random access, memory-mapped), which a stream cannot
serve; sequence shards are small next to items and read every epoch. The cache folder is keyed by the URL
(`$TRANSREC_SHARD_CACHE`, default `~/.cache/transrec/shards/<sha256(url)[:16]>`). Each file is downloaded to a
temporary name, checked against the manifest's `file_sha256` (written by `data_shards.build`) and size, then
renamed; the manifest is written last, so a folder with a manifest is complete. A file already in the cache is
re-verified before use (a truncated or altered copy is fetched again): through data_shards/integrity.py, which hashes a
file once and remembers its digest with its stat, so a later run only `stat`s an unchanged cached copy, and the
readers' own verification of the local folder finds every digest already known. Shards built before the manifest
carried hashes are refused: rebuild them, or copy the folder and pass its path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.request
from pathlib import Path

from transrec.data_shards.integrity import FIXED_FILES, file_digests, shard_files

__all__ = ["FIXED_FILES", "cache_root", "is_url", "local_shards", "localize", "shard_files"]


def is_url(shards: str | os.PathLike) -> bool:
    return "://" in str(shards)


def cache_root() -> Path:
    return Path(os.environ.get("TRANSREC_SHARD_CACHE", Path.home() / ".cache" / "transrec" / "shards"))


def _open(url: str):
    if url.startswith(("http://", "https://", "file://")):
        return urllib.request.urlopen(url, timeout=60)  # noqa: S310 (the schemes are checked above)
    try:
        import fsspec
    except ImportError as e:
        raise RuntimeError(f"{url}: only http(s) and file URLs work without fsspec; pip install fsspec") from e
    try:
        return fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as e:
        raise RuntimeError(f"{url}: fsspec has no backend for this scheme here ({e}); install it (e.g. s3fs for "
                           "s3://) or copy the folder and pass a local path") from e


def _download(url: str, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with _open(url) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"could not download {url}: {e}") from e
    os.replace(tmp, dest)


def localize(shards: str | os.PathLike, root: Path | None = None, log=print) -> Path:
    """The local folder for `shards`: itself when local, else the verified cache of the URL (filled once)."""
    if not is_url(shards):
        return Path(shards)
    url = str(shards).rstrip("/")
    folder = (root or cache_root()) / hashlib.sha256(url.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _open(f"{url}/manifest.json") as f:
            raw = f.read()
    except OSError as e:
        raise RuntimeError(f"could not read {url}/manifest.json ({e}): check the URL and that the server is up") from e
    manifest = json.loads(raw)
    hashes = manifest.get("file_sha256")
    if not hashes:
        raise RuntimeError(f"{url}/manifest.json lists no file hashes (shards built before they were recorded): "
                           "rebuild the shards with data_shards.build, or copy the folder and pass its local path")
    fetched = 0
    names = shard_files(manifest)
    for name in names:
        if name not in hashes:
            raise RuntimeError(f"{url}/manifest.json has no hash for {name}: rebuild the shards")
    cached, _ = file_digests(folder, names)  # hashed once, then known by stat
    for name in names:
        dest = folder / name
        if cached[name] == hashes[name]:
            continue
        _download(f"{url}/{name}", dest)
        if file_digests(folder, [name])[0][name] != hashes[name]:
            bad = dest.with_name(dest.name + ".corrupt")
            os.replace(dest, bad)
            raise RuntimeError(f"{url}/{name}: sha256 differs from the manifest's (truncated or altered in transit "
                               f"or on the server; kept as {bad}); fix the served copy and run again")
        fetched += 1
    tmp = folder / f".manifest.json.{os.getpid()}.part"
    tmp.write_bytes(raw)
    os.replace(tmp, folder / "manifest.json")  # last: a folder with a manifest is complete
    log(f"shards {url}: {fetched} file(s) fetched, {len(shard_files(manifest)) - fetched} already cached and "
        f"verified, in {folder}")
    return folder


def local_shards(shards: str) -> str:
    """What a command passes on for its --shards: a URL becomes its verified local cache (localize), a path stays as
    it is. A copy that cannot be made or verified ends the command with one line (SystemExit "error: ...")."""
    if not is_url(shards):
        return str(shards)
    try:
        return str(localize(shards))
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None
