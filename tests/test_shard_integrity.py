"""Local shards are checked against their manifest's `file_sha256` before their bytes are used: an altered, truncated,
swapped or missing file is one line naming it, raised by the first reader, before any tar is parsed; a file is hashed
once and later opens only `stat` it (the digest remembered in the process and in a record on disk); shards built
before the hashes existed load with one warning."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import image_content

from transrec.data_shards import integrity
from transrec.data_shards.build import BuildOptions, build
from transrec.data_shards.integrity import IntegrityError, record_path, verify_shards
from transrec.data_shards.loader import LoaderConfig, make_train_loader
from transrec.data_shards.sequence_table import SequenceTable
from transrec.data_shards.shard_io import ItemStore, read_sequences

REPO = Path(__file__).resolve().parents[1]
HM = REPO / "data" / "hm-fashion-fixture"
LOADER = LoaderConfig(window=9, batch_size=16, stride=9, load_content=True, decode_in_loader=False,
                      content=image_content())
READERS = {
    "ItemStore": ItemStore,
    "SequenceTable": SequenceTable,
    "read_sequences": read_sequences,
    "loader": lambda d: next(iter(make_train_loader(d, LOADER))),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """The bundled H&M fixture in 3 item tars and 4 sequence tars (same size each), and the cache folder whose
    record its build wrote. Shared: tests damage copies."""
    root = tmp_path_factory.mktemp("integrity")
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setenv("TRANSREC_SHARD_CACHE", str(root / "build-cache"))
        build(BuildOptions(dataset="hm-fashion", source=HM, out=root / "hm", max_tokens=16, items_per_shard=300,
                           users_per_shard=50, workers=2))
    return root / "hm", root / "build-cache"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test: its own record folder and a process that remembers nothing yet."""
    monkeypatch.setenv("TRANSREC_SHARD_CACHE", str(tmp_path / "cache"))
    integrity.forget()
    yield
    integrity.forget()


@pytest.fixture()
def shards(built, tmp_path) -> Path:
    """A fresh copy of the built shards (new files: nothing known about them)."""
    shutil.copytree(built[0], tmp_path / "hm")
    return tmp_path / "hm"


@pytest.fixture()
def hashed(monkeypatch) -> list[str]:
    """The names of the files hashed, in the order they were hashed."""
    seen: list[str] = []
    original = integrity.hash_file

    def counting(path):
        seen.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(integrity, "hash_file", counting)
    return seen


@pytest.fixture()
def warned(caplog):
    """caplog on the "transrec" logger, also after the trainer has made it stop propagating to the root logger."""
    logger = logging.getLogger("transrec")
    attach = not logger.propagate
    if attach:
        logger.addHandler(caplog.handler)
    with caplog.at_level(logging.WARNING, logger="transrec"):
        yield caplog
    if attach:
        logger.removeHandler(caplog.handler)


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def refused(reader, folder: Path, name: str, what: str = "differs from the sha256 recorded in manifest.json") -> str:
    """The reader raises IntegrityError: one line naming the file, what is wrong and what to do, raised on its own
    (not while handling a tarfile, numpy or JSON error)."""
    with pytest.raises(IntegrityError) as e:
        reader(folder)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert str(folder / name) in msg and what in msg, msg
    assert "or restore the file" in msg and "rebuild the shards with `python -m transrec.data_shards.build" in msg
    assert "--dataset hm-fashion --source SOURCE --modality mixed" in msg
    assert e.value.__context__ is None and e.value.__cause__ is None
    return msg


def item_payload(folder: Path, modality: str) -> tuple[Path, int, int]:
    """(item tar, offset, size) of the first item with a payload of `modality`."""
    store = ItemStore(folder)
    item = int(np.flatnonzero(store.index[f"{modality}_size"] > 0)[0])
    rec = store.index[item]
    return (folder / store.manifest["shards"]["items"][int(rec["shard"])], int(rec[f"{modality}_offset"]),
            int(rec[f"{modality}_size"]))


# -- damage: named by the first reader ---------------------------------------------------------------------------------
def test_a_flipped_token_byte_is_named_by_the_item_store(shards):
    tar, offset, size = item_payload(shards, "text")  # verified and remembered first: the damage comes after
    flip(tar, offset + size // 2)
    refused(ItemStore, shards, tar.name)


def test_a_flipped_jpeg_byte_is_named_by_the_item_store(shards):
    tar, offset, size = item_payload(shards, "image")
    integrity.forget()
    flip(tar, offset + size // 2)
    with tarfile.open(tar) as t:  # still a valid tar: only the hash sees it
        assert any(m.name.endswith(".jpg") for m in t)
    refused(ItemStore, shards, tar.name)


@pytest.mark.parametrize("reader", READERS)
def test_a_damaged_sequence_tar_is_refused_by_every_reader(shards, reader):
    name = manifest_of(shards)["shards"]["sequences"][1]
    flip(shards / name, 2000)  # inside a user's JSON
    refused(READERS[reader], shards, name)


@pytest.mark.parametrize("kind", ["items", "sequences"])
def test_a_truncated_tar_is_named_before_any_tar_parsing(shards, kind):
    name = manifest_of(shards)["shards"][kind][0]
    with open(shards / name, "r+b") as f:
        f.truncate(os.path.getsize(shards / name) // 2)
    refused(ItemStore if kind == "items" else SequenceTable, shards, name)


@pytest.mark.parametrize("kind", ["items", "sequences"])
def test_a_flipped_tar_header_byte_is_named_before_any_tar_parsing(shards, kind):
    name = manifest_of(shards)["shards"][kind][0]
    flip(shards / name, 0)  # the first member's name: tarfile would fail on its header checksum
    refused(ItemStore if kind == "items" else SequenceTable, shards, name)
    refused(READERS["loader"], shards, name)


def test_two_swapped_item_tars_are_named(shards):
    a, b = manifest_of(shards)["shards"]["items"][:2]
    os.rename(shards / a, shards / "swap")
    os.rename(shards / b, shards / a)
    os.rename(shards / "swap", shards / b)
    refused(ItemStore, shards, a)


def test_two_swapped_tars_of_the_same_size_and_mtime_are_named_after_a_verification(shards):
    a, b = manifest_of(shards)["shards"]["sequences"][:2]
    assert os.path.getsize(shards / a) == os.path.getsize(shards / b)
    stamp = os.stat(shards / a).st_mtime_ns
    os.utime(shards / b, ns=(stamp, stamp))
    SequenceTable(shards)  # verified: every file's digest is remembered and recorded
    os.rename(shards / a, shards / "swap")
    os.rename(shards / b, shards / a)
    os.rename(shards / "swap", shards / b)  # each path: the same size and mtime as what was verified there
    refused(SequenceTable, shards, a)


@pytest.mark.parametrize("name", ["item_index.npy", "id_maps.json", "items-000002.tar", "sequences-000003.tar"])
def test_a_missing_listed_file_is_named(shards, name):
    (shards / name).unlink()
    refused(ItemStore, shards, name, what="missing (or not a file), but listed in manifest.json's file_sha256")


def test_a_manifest_that_lost_a_hash_is_refused(shards):
    manifest = manifest_of(shards)
    del manifest["file_sha256"]["item_index.npy"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=r"file_sha256 lists no hash for item_index\.npy.*rebuild the shards"):
        ItemStore(shards)


def test_a_file_changed_after_the_loader_was_made_is_named_at_its_next_epoch(shards):
    loader = make_train_loader(shards, LoaderConfig(window=9, batch_size=16, stride=9, num_workers=2,
                                                    load_content=True, decode_in_loader=False, content=image_content()))
    assert sum(1 for _ in loader) == loader.steps_per_epoch
    name = manifest_of(shards)["shards"]["items"][2]
    flip(shards / name, 5000)
    loader.set_epoch(1)
    with pytest.raises(IntegrityError) as e:
        next(iter(loader))
    assert "\n" not in str(e.value) and str(shards / name) in str(e.value)


def test_a_worker_s_wrapped_error_is_brought_back_to_one_line():
    from torch._utils import ExceptionWrapper

    try:
        raise IntegrityError("shards/items-000000.tar: differs ...; rebuild ... or restore the file")
    except IntegrityError:
        wrapped = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 1")
    with pytest.raises(IntegrityError) as e:
        wrapped.reraise()
    assert "\n" in str(e.value)  # what the DataLoader raises: the worker's traceback in the message
    assert integrity.one_line(e.value) == "shards/items-000000.tar: differs ...; rebuild ... or restore the file"


# -- the cost: hashed once, then a stat --------------------------------------------------------------------------------
def test_a_file_is_hashed_once_then_known_by_its_stat(shards, hashed):
    listed = sorted(manifest_of(shards)["file_sha256"])
    report = verify_shards(shards)
    assert sorted(hashed) == listed and report.hashed_files == len(listed) and report.hashed_bytes > 7_000_000
    store, table = ItemStore(shards), SequenceTable(shards)
    bytes(store.payload(0, "text"))
    read_sequences(shards)
    assert sum(1 for _ in make_train_loader(shards, LOADER)) > 1  # an epoch (and each epoch's check)
    assert len(table) == 200 and sorted(hashed) == listed  # nothing hashed again
    integrity.forget()  # as a new process: the record on disk answers
    assert verify_shards(shards).hashed_files == 0 and sorted(hashed) == listed
    record = json.loads(record_path(shards).read_text())
    assert record["folder"] == str(shards.resolve()) and sorted(record["files"]) == listed
    assert not set(os.listdir(shards)) - {*listed, "manifest.json", "validation.json"}  # the folder is not written


def test_a_new_process_only_stats_the_files(shards):
    verify_shards(shards)
    code = ("from transrec.data_shards.integrity import verify_shards; import sys; "
            "print(verify_shards(sys.argv[1]).hashed_files)")
    out = subprocess.run([sys.executable, "-c", code, str(shards)], capture_output=True, text=True, check=True,
                         cwd=REPO, env=dict(os.environ))
    assert out.stdout.strip() == "0", out.stderr


def test_a_changed_mtime_or_size_is_hashed_again(shards, hashed):
    verify_shards(shards)
    hashed.clear()
    a, b = manifest_of(shards)["shards"]["items"][:2]
    st = os.stat(shards / a)
    os.utime(shards / a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched, same bytes
    assert verify_shards(shards).hashed_files == 1 and hashed == [a]
    with open(shards / b, "ab") as f:  # one byte more
        f.write(b"\0")
    refused(ItemStore, shards, b)
    assert hashed == [a, b]


def test_a_replacement_with_the_same_size_and_mtime_is_hashed_again(shards, hashed):
    verify_shards(shards)
    hashed.clear()
    name = manifest_of(shards)["shards"]["sequences"][2]
    st = os.stat(shards / name)
    data = bytearray((shards / name).read_bytes())
    data[3000] ^= 0xFF
    (shards / "new").write_bytes(bytes(data))
    os.replace(shards / "new", shards / name)
    os.utime(shards / name, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `touch -r`: size and mtime as verified
    refused(SequenceTable, shards, name)
    assert hashed == [name]


def test_a_damaged_record_is_ignored_and_rewritten(shards, hashed, warned):
    listed = manifest_of(shards)["file_sha256"]
    verify_shards(shards)
    record = record_path(shards)
    good = json.loads(record.read_text())
    name = manifest_of(shards)["shards"]["items"][0]
    forged = {**good, "files": {**good["files"], name: {**good["files"][name], "sha256": "0" * 64}}}
    for damage in (record.read_text()[:200],  # cut short
                   json.dumps({**good, "check": "0" * 64}),  # its checksum altered
                   json.dumps(forged),  # a digest altered, the checksum not updated
                   json.dumps({**good, "folder": "/elsewhere"})):  # another folder's
        record.write_text(damage)
        integrity.forget()
        hashed.clear()
        assert verify_shards(shards).hashed_files == len(listed)
        assert "ignoring the damaged shard verification record" in warned.text
        assert json.loads(record.read_text())["files"] == good["files"]  # rebuilt
        warned.clear()


def test_an_unwritable_record_folder_still_verifies(shards, hashed, tmp_path, monkeypatch, warned):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("TRANSREC_SHARD_CACHE", str(blocked))  # no folder can be made under it
    assert verify_shards(shards).hashed_files == len(manifest_of(shards)["file_sha256"])
    assert "could not save the shard verification record" in warned.text
    assert verify_shards(shards).hashed_files == 0  # this process still remembers


def test_the_build_records_what_it_hashed(built, monkeypatch, hashed):
    folder, cache = built
    monkeypatch.setenv("TRANSREC_SHARD_CACHE", str(cache))
    assert verify_shards(folder).hashed_files == 0 and hashed == []
    assert ItemStore(folder).num_items == manifest_of(folder)["num_items"]


# -- older shards, the command -----------------------------------------------------------------------------------------
def test_shards_without_hashes_load_with_one_warning(shards, warned):
    manifest = manifest_of(shards)
    del manifest["file_sha256"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    flip(shards / manifest["shards"]["items"][0], 0)  # nothing to check it against
    store, table = ItemStore(shards), SequenceTable(shards)
    next(iter(make_train_loader(shards, LOADER)))
    assert store.num_items == manifest["num_items"] and len(table) == manifest["num_users"]
    warnings = [r.getMessage() for r in warned.records if "file_sha256" in r.getMessage()]
    assert len(warnings) == 1 and str(shards) in warnings[0] and "loading them unverified" in warnings[0]


def test_the_verify_command_hashes_everything_again(shards, capsys, hashed):
    from transrec.data_shards.verify import main

    verify_shards(shards)
    hashed.clear()
    assert main([str(shards)]) == 0
    listed = manifest_of(shards)["file_sha256"]
    assert sorted(hashed) == sorted(listed) and f"{len(listed)} files" in capsys.readouterr().out
    name = manifest_of(shards)["shards"]["sequences"][0]
    flip(shards / name, 700)
    st = os.stat(shards / name)
    assert main([str(shards)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {shards / name}: differs") and err.count("\n") == 1
    assert os.stat(shards / name).st_size == st.st_size


def test_a_damaged_manifest_is_named(shards):
    text = (shards / "manifest.json").read_text()
    (shards / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(IntegrityError) as e:
        ItemStore(shards)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{shards / 'manifest.json'}: not a readable manifest")
    assert e.value.__suppress_context__  # the JSON error's traceback is not shown


def test_the_rebuild_command_follows_the_manifest():
    synthetic = {"provenance": {"kind": "synthetic", "users": 300, "items": 200, "mean_length": 20.0, "zipf": 1.1,
                                "images": 64, "seed": 3}}
    assert integrity.rebuild_command(synthetic, "out") == (
        "python -m transrec.data_shards.synth --users 300 --items 200 --mean-length 20.0 --zipf 1.1 --images 64 "
        "--seed 3 --out out")
    generic = {"dataset": "generic", "modality": "text", "seed": 2,
               "policies": {"dedup": "first", "min_interactions": 5}}
    assert integrity.rebuild_command(generic, "out") == (
        "python -m transrec.data_shards.build --dataset generic --source SOURCE --modality text --seed 2 --dedup first "
        "--min-interactions 5 ... --out out")
