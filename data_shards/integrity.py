"""File integrity: the error every loader raises when a file differs from the hash recorded when it was written
(shards against their manifest's `file_sha256`, exports and checkpoints against their `files.sha256.json`), and the
verification of shard folders.

Shards. Every file a shard folder's manifest lists in `file_sha256` is hashed and compared before its bytes are used:
`shard_io.load_manifest` calls `verify_shards`, and every reader (`ItemStore`, `SequenceTable`, `read_sequences`, the
training loader, the evaluator's streams) opens a folder through `load_manifest` first; the places that open a tar
later (`ItemStore`'s lazy memory maps in loader workers, `sequence_records`, the loader at each epoch) call
`check_file` / `verify_shards` again, which costs one `stat` per file.

What makes it cheap. A file is hashed once; its digest is remembered with the file's (size, mtime_ns, ctime_ns,
inode) in this process and in a record on disk, so that later opens (the next epoch, the next run, the evaluator,
other workers and ranks) only `stat` the files. A file whose stat changed (rewritten, truncated, replaced, renamed
over, `touch`ed) is hashed again. The record is a JSON file per folder under the user cache
(`$TRANSREC_SHARD_CACHE/verified/`, default `~/.cache/transrec/shards/verified/`), named by the hash of the
folder's resolved path, written atomically (temporary file, then rename) under a file lock, so that ranks starting
together hash a folder once; a record that does not parse or fails its own checksum is ignored and rewritten. The
shard folder itself is never written: it stays byte-for-byte what the builder made.

Limitation: a change that keeps a file's size, mtime, ctime and inode (bit rot on the disk, a write to the device
below the file system) is caught only when there is no record: `python -m transrec.data_shards.verify DIR` hashes
every file again and refreshes the record.

Shards built before `file_sha256` existed load with one warning per folder and process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

RECORD_FORMAT = 1
FIXED_FILES = ("item_index.npy", "id_maps.json")  # beside the manifest's shard lists; hashed by every builder since
# file_sha256 exists, so a manifest with hashes that lacks one of them has been edited
StatKey = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode

log = logging.getLogger("transrec")


class IntegrityError(RuntimeError):
    """A file is missing, truncated or altered against the hash recorded when it was written."""


@dataclass
class Verification:
    """What one verification did: files checked, files (and bytes) hashed, seconds."""

    files: int = 0
    hashed_files: int = 0
    hashed_bytes: int = 0
    seconds: float = 0.0


# -- process-wide state: digests by resolved path, hashes of the folders verified, folders warned about ------------
_digests: dict[str, tuple[StatKey, str]] = {}  # resolved path -> (stat key when hashed, sha256)
_verified: dict[str, dict[str, str]] = {}  # resolved folder -> the file_sha256 it was last verified against
_warned: set[str] = set()
_lock = threading.RLock()


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.RLock()  # a fork while another thread held it would leave the child's copy locked forever


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_reset_after_fork)


def forget() -> None:
    """Drop what this process remembers (digests, verified folders, warnings): as a new process starts."""
    with _lock:
        _digests.clear()
        _verified.clear()
        _warned.clear()


def shard_files(manifest: dict) -> list[str]:
    """Every file a trainer, evaluator or recommender reads from a shard folder, besides the manifest."""
    return [*manifest["shards"]["items"], *manifest["shards"]["sequences"], *FIXED_FILES]


def hash_file(path: Path | str) -> str:
    """The sha256 of a file's bytes (read in 1 MiB blocks; hashlib releases the GIL, so threads hash in parallel)."""
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _stat_key(path: Path) -> StatKey | None:
    """None when `path` is not a regular file (missing, a folder, ...)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


# -- the record on disk ---------------------------------------------------------------------------------------------
def record_root() -> Path:
    base = os.environ.get("TRANSREC_SHARD_CACHE") or Path.home() / ".cache" / "transrec" / "shards"
    return Path(base) / "verified"


def record_path(shard_dir: Path | str) -> Path:
    """The verification record of a shard folder (keyed by its resolved path)."""
    folder = str(Path(shard_dir).resolve())
    return record_root() / f"{hashlib.sha256(folder.encode()).hexdigest()[:20]}.json"


def _checksum(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _read_record(folder: str) -> dict[str, tuple[StatKey, str]]:
    """name -> (stat key, sha256) from the folder's record; {} when there is none or it is damaged (ignored)."""
    path = record_path(folder)
    try:
        raw = path.read_bytes()
    except OSError:
        return {}
    try:
        data = json.loads(raw)
        files = data["files"]
        if data["format"] != RECORD_FORMAT or data["folder"] != folder or data["check"] != _checksum(files):
            raise ValueError("format, folder or checksum")
        out = {}
        for name, e in files.items():
            key = (e["size"], e["mtime_ns"], e["ctime_ns"], e["inode"])
            if not all(isinstance(v, int) for v in key) or len(e["sha256"]) != 64:
                raise ValueError(f"entry {name}")
            out[name] = (key, e["sha256"])
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning(f"ignoring the damaged shard verification record {path} ({type(e).__name__}: {e}): the files of "
                    f"{folder} are hashed again")
        return {}


def _write_record(folder: str, entries: dict[str, tuple[StatKey, str]]) -> None:
    path = record_path(folder)
    files = {n: {"size": k[0], "mtime_ns": k[1], "ctime_ns": k[2], "inode": k[3], "sha256": d}
             for n, (k, d) in sorted(entries.items())}
    body = json.dumps({"format": RECORD_FORMAT, "folder": folder, "check": _checksum(files), "files": files}, indent=1)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(body)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if "<record>" not in _warned:
            _warned.add("<record>")
            log.warning(f"could not save the shard verification record {path} ({e}): every new process hashes the "
                        "shards again; set $TRANSREC_SHARD_CACHE to a writable folder")
        return
    _prune(path)


def _prune(keep: Path) -> None:
    """Remove the records (and lock files) of folders that no longer exist."""
    for other in keep.parent.glob("*.json"):
        if other == keep:
            continue
        try:
            folder = json.loads(other.read_bytes())["folder"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # another process's record being written, or damaged: left for its own folder to rewrite
        if isinstance(folder, str) and not os.path.isdir(folder):
            for p in (other, other.with_suffix(".lock")):
                with contextlib.suppress(OSError):
                    p.unlink()


@contextlib.contextmanager
def _record_lock(folder: str) -> Iterator[None]:
    """An exclusive lock on the folder's record (processes that start together: one hashes, the others then read its
    record); without a lock when the cache folder cannot be written."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = record_path(folder).with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")
    except OSError:
        yield
        return
    with f:
        with contextlib.suppress(OSError):  # a file system without locks: go on unlocked
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


# -- digests ----------------------------------------------------------------------------------------------------------
def _hash_or_none(path: Path) -> str | None:
    try:
        return hash_file(path)
    except OSError:  # vanished or unreadable since its stat: it cannot match any hash
        return None


def hash_files(shard_dir: Path | str, names: list[str]) -> dict[str, tuple[StatKey | None, str | None]]:
    """name -> (stat key, sha256) of each file, hashed in parallel threads; the key is None for a file that is
    missing or whose stat changed while it was read (its digest is then not to be remembered)."""
    shard_dir = Path(shard_dir)
    keys = {n: _stat_key(shard_dir / n) for n in names}
    present = [n for n in names if keys[n] is not None]
    workers = max(1, min(len(present), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(workers) as pool:
        digests = dict(zip(present, pool.map(_hash_or_none, [shard_dir / n for n in present])))
    return {n: (keys[n] if keys[n] is not None and _stat_key(shard_dir / n) == keys[n] else None, digests.get(n))
            for n in names}


def remember(shard_dir: Path | str, entries: dict[str, tuple[StatKey | None, str | None]]) -> None:
    """Digests computed elsewhere (`hash_files`: the builder's, before it renamed its folder into place), kept in this
    process and in the folder's record for the files whose stat still equals the key they were hashed under."""
    shard_dir = Path(shard_dir)
    folder = str(shard_dir.resolve())
    with _lock, _record_lock(folder):
        record = _read_record(folder)
        for n, (key, digest) in entries.items():
            if key is not None and digest is not None and _stat_key(shard_dir / n) == key:
                _digests[os.path.join(folder, n)] = record[n] = (key, digest)
        _write_record(folder, {n: e for n, e in record.items() if _stat_key(shard_dir / n) == e[0]})


def file_digests(shard_dir: Path | str, names: list[str], force: bool = False) -> tuple[dict[str, str | None],
                                                                                      Verification]:
    """The sha256 of each file `shard_dir / name` (None: missing or not a file), hashing only the files whose stat
    is not remembered (in this process or in the folder's record); `force`: hash every file again."""
    start = time.perf_counter()
    shard_dir = Path(shard_dir)
    folder = str(shard_dir.resolve())
    report = Verification(files=len(names))
    with _lock:
        keys = {n: _stat_key(shard_dir / n) for n in names}
        out: dict[str, str | None] = {n: None for n in names}
        todo = []
        for n in names:
            known = _digests.get(os.path.join(folder, n))
            if keys[n] is None:
                continue
            if not force and known and known[0] == keys[n]:
                out[n] = known[1]
            else:
                todo.append(n)
        if todo:
            with _record_lock(folder):
                record = _read_record(folder)
                if not force:  # another process may have hashed them meanwhile
                    for n in [n for n in todo if n in record and record[n][0] == keys[n]]:
                        out[n] = record[n][1]
                        _digests[os.path.join(folder, n)] = record[n]
                        todo.remove(n)
                if todo:
                    for n, (key, digest) in hash_files(shard_dir, todo).items():
                        out[n] = digest
                        report.hashed_files += 1
                        report.hashed_bytes += keys[n][0]
                        if key is not None and digest is not None:
                            _digests[os.path.join(folder, n)] = record[n] = (key, digest)
                        else:
                            record.pop(n, None)
                    _write_record(folder, {n: e for n, e in record.items() if _stat_key(shard_dir / n) == e[0]})
    report.seconds = time.perf_counter() - start
    return out, report


# -- shard folders ----------------------------------------------------------------------------------------------------
def rebuild_command(manifest: dict, shard_dir: Path | str) -> str:
    """The command that builds `shard_dir` again, as far as its manifest says (SOURCE: the raw tables' folder)."""
    prov = manifest.get("provenance") or {}
    if prov.get("kind") == "synthetic":
        flags = " ".join(f"--{k.replace('_', '-')} {prov[k]}" for k in ("users", "items", "mean_length", "zipf",
                                                                      "images", "seed") if k in prov)
        return f"python -m transrec.data_shards.synth {flags} --out {shard_dir}"
    dataset = manifest.get("dataset", "DATASET")
    flags = f"--dataset {dataset} --source SOURCE --modality {manifest.get('modality', 'mixed')}"
    if manifest.get("seed"):
        flags += f" --seed {manifest['seed']}"
    policies = manifest.get("policies") or {}
    if policies.get("dedup", "keep") != "keep":
        flags += f" --dedup {policies['dedup']}"
    if policies.get("min_interactions", 3) != 3:
        flags += f" --min-interactions {policies['min_interactions']}"
    return f"python -m transrec.data_shards.build {flags}{' ...' if dataset == 'generic' else ''} --out {shard_dir}"


def read_manifest(shard_dir: Path | str) -> dict:
    """manifest.json of a shard folder, parsed but not verified (`shard_io.load_manifest` verifies)."""
    path = Path(shard_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no manifest.json in {shard_dir}: build shards first, e.g. `python -m transrec.data_shards.build "
            f"--dataset movielens-100k-mm --source data/movielens-100k-mm --modality mixed --out {shard_dir}`"
        )
    try:
        manifest = json.loads(path.read_bytes())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        return manifest
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise IntegrityError(f"{path}: not a readable manifest ({type(e).__name__}: {str(e).splitlines()[0]}): "
                             "truncated or altered; rebuild the shards with `python -m transrec.data_shards.build "
                             "...` or restore the file") from None


def _missing(manifest: dict, shard_dir: Path, name: str) -> IntegrityError:
    return IntegrityError(f"{shard_dir / name}: missing (or not a file), but listed in manifest.json's file_sha256; "
                          f"rebuild the shards with `{rebuild_command(manifest, shard_dir)}` or restore the file")


def _differs(manifest: dict, shard_dir: Path, name: str) -> IntegrityError:
    size = _stat_key(shard_dir / name)
    return IntegrityError(
        f"{shard_dir / name}: differs from the sha256 recorded in manifest.json when the shards were built: truncated, "
        f"altered or swapped ({size[0] if size else '?'} bytes now); rebuild the shards with "
        f"`{rebuild_command(manifest, shard_dir)}` or restore the file")


def verify_shards(shard_dir: Path | str, manifest: dict | None = None, force: bool = False) -> Verification | None:
    """Every file of `manifest["file_sha256"]` (default: the folder's manifest.json) against its hash, before any of
    them is read: raises IntegrityError naming the first missing or differing file. Hashes only what this process or
    the record has not seen with the same stat (`force`: everything). None for shards built without hashes (loaded
    with a warning, once per folder and process)."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir) if manifest is None else manifest
    hashes = manifest.get("file_sha256")
    folder = str(shard_dir.resolve())
    if not hashes:
        with _lock:
            _verified[folder] = {}
            if folder not in _warned:
                _warned.add(folder)
                log.warning(f"{shard_dir}: manifest.json has no file_sha256 (shards built before file hashes were "
                            "recorded): loading them unverified; rebuild them to have every file checked")
        return None
    unlisted = [n for n in shard_files(manifest) if n not in hashes]
    if unlisted:
        raise IntegrityError(f"{shard_dir / 'manifest.json'}: file_sha256 lists no hash for {unlisted[0]}, a file the "
                             f"readers use (the manifest was edited); rebuild the shards with "
                             f"`{rebuild_command(manifest, shard_dir)}` or restore manifest.json")
    names = list(hashes)
    for n in names:  # a missing file is named before anything is hashed
        if _stat_key(shard_dir / n) is None:
            raise _missing(manifest, shard_dir, n)
    digests, report = file_digests(shard_dir, names, force=force)
    for n in names:
        if digests[n] != hashes[n]:
            raise _differs(manifest, shard_dir, n)
    with _lock:
        _verified[folder] = dict(hashes)
    return report


def check_file(path: Path | str, manifest: dict | None = None) -> None:
    """Just before a shard file is opened: its stat against the digest verified for it (one `stat`); a file that
    changed since is hashed again and compared. `manifest`: the one its reader loaded (default: the hashes its folder
    was last verified against in this process, else the folder is verified now). A file outside any shard folder
    (no manifest.json beside it) has nothing to be checked against."""
    path = Path(path)
    folder = str(path.parent.resolve())
    if manifest is not None:
        hashes = manifest.get("file_sha256") or {}
    else:
        with _lock:
            hashes = _verified.get(folder)
        if hashes is None:
            if (path.parent / "manifest.json").exists():
                verify_shards(path.parent)
            return
    expected = hashes.get(path.name)
    if expected is None:
        return  # unverified shards (warned when loaded), or a file the manifest does not list
    key = _stat_key(path)
    known = _digests.get(os.path.join(folder, path.name))
    if key is not None and known is not None and known == (key, expected):
        return
    if manifest is None:
        with contextlib.suppress(FileNotFoundError, IntegrityError):
            manifest = read_manifest(path.parent)  # for the rebuild command in the message
    if key is None:
        raise _missing(manifest or {}, path.parent, path.name)
    digests, _ = file_digests(path.parent, [path.name])
    if digests[path.name] != expected:
        raise _differs(manifest or {}, path.parent, path.name)


def one_line(error: BaseException) -> str:
    """The IntegrityError's own line out of a message that wraps a traceback (a DataLoader worker's re-raise)."""
    text = str(error)
    marker = f"{IntegrityError.__name__}: "
    lines = [ln for ln in text.splitlines() if marker in ln]
    return lines[-1].split(marker, 1)[1] if "\n" in text and lines else text
