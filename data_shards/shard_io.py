"""Shard files: a deterministic WebDataset tar writer and the readers built on its byte offsets.

Layout of a shard directory (see data_shards/README.md):
    manifest.json          counts, rules, vocabularies, input hashes, shard list
    validation.json        every bad-input finding by category (ids, file, line)
    id_maps.json           raw id <-> index for users and items
    items-NNNNNN.tar       one sample per item:  KEY.json (meta + raw text), KEY.tokens.npy, KEY.jpg
    sequences-NNNNNN.tar   one sample per user:  KEY.json (full chronological history, split, features)
    item_index.npy         per item: shard number, modality code and, per modality of `manifest["modalities"]`, the
                           byte offset and size of its payload inside the tar (size 0: the item has none)

Every file the manifest lists in `file_sha256` is checked against its hash before it is read (`load_manifest`,
data_shards/integrity.py). Tars are written with fixed metadata (mtime 0, uid 0, sorted keys), so the same inputs
give the same bytes.
`ItemStore` reads any item's payload of any modality by offset from memory-mapped tars: no shard scanning. What a
payload is and how it becomes a tower's input is the modality's content kind (data_shards/modalities.py). Format 1
shards (text and image only, fixed `tok_*` / `jpg_*` columns) are read through the same interface.
"""

from __future__ import annotations

import io
import json
import mmap
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from transrec.data_shards.integrity import check_file, read_manifest, verify_shards

FORMAT_VERSION = 2  # 2: item index keyed by modality name (`manifest["modalities"]`); 1: fixed text / image columns
BUILT_IN_MODALITIES = ("text", "image")
FORMAT1_INDEX_DTYPE = np.dtype(
    [
        ("shard", "<i4"),
        ("modality", "<i1"),  # 0 text, 1 image (the item's assigned modality)
        ("tok_offset", "<i8"),  # byte offset of the raw int32 token data (after the .npy header)
        ("tok_len", "<i4"),  # number of tokens
        ("jpg_offset", "<i8"),
        ("jpg_size", "<i8"),  # 0: the item has no usable image
    ]
)


def item_index_dtype(modalities: tuple[str, ...] | list[str]) -> np.dtype:
    """The item index of a format-2 shard folder: shard, modality code, then offset and size per modality."""
    cols = [("shard", "<i4"), ("modality", "<i1")]
    for name in modalities:
        cols += [(f"{name}_offset", "<i8"), (f"{name}_size", "<i8")]
    return np.dtype(cols)


def _from_format1(old: np.ndarray) -> np.ndarray:
    index = np.zeros(len(old), dtype=item_index_dtype(BUILT_IN_MODALITIES))
    index["shard"], index["modality"] = old["shard"], old["modality"]
    index["text_offset"], index["text_size"] = old["tok_offset"], old["tok_len"].astype(np.int64) * 4
    index["image_offset"], index["image_size"] = old["jpg_offset"], old["jpg_size"]
    return index


class DeterministicTarWriter:
    """Writes tar members with fixed metadata and returns the byte offset of each member's data."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        # The data ends where the file position is now, minus tar's padding to 512-byte blocks.
        end = self._file.tell()
        padded = (len(data) + 511) // 512 * 512
        return end - padded

    def close(self) -> None:
        self._tar.close()
        self._file.close()


def npy_bytes(array: np.ndarray) -> tuple[bytes, int]:
    """The .npy encoding of `array` and the length of its header (where the raw data starts)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    data = buf.getvalue()
    return data, len(data) - array.nbytes


def load_manifest(shard_dir: Path | str) -> dict:
    """The folder's manifest, after every file it lists in `file_sha256` has been checked against its hash
    (data_shards/integrity.py: hashed once, then a `stat` per file): every reader opens a shard folder through here,
    so no shard byte is read unverified. Raises IntegrityError naming a missing or differing file."""
    manifest = read_manifest(shard_dir)
    verify_shards(shard_dir, manifest)
    return manifest


def read_id_maps(shard_dir: Path | str) -> dict:
    """id_maps.json ({"items": [raw id by index], "users": [...]}), verified with the rest of the folder."""
    load_manifest(shard_dir)
    return json.loads((Path(shard_dir) / "id_maps.json").read_text())


def sequence_records(shard: Path) -> Iterator[dict]:
    """The user samples (json) of one sequence tar, in file order, one at a time (the tar checked against its
    folder's manifest first: one `stat` once the folder is verified)."""
    check_file(shard)
    with tarfile.open(shard) as tar:
        while (member := tar.next()) is not None:
            if member.name.endswith(".json"):
                yield json.loads(tar.extractfile(member).read())
            tar.members = []  # TarFile keeps every member header it read: one per user here, O(users) otherwise


def read_sequences(shard_dir: Path | str) -> list[dict]:
    """All user samples (json) in user-index order; used for evaluation and for building the loader's index."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    out = [r for name in manifest["shards"]["sequences"] for r in sequence_records(shard_dir / name)]
    out.sort(key=lambda s: s["user"])
    if [s["user"] for s in out] != list(range(manifest["num_users"])):
        raise ValueError(
            f"sequence shards in {shard_dir} do not hold users 0..{manifest['num_users'] - 1}: rebuild them"
        )
    return out


class ItemStore:
    """Random access to every item's content by index, from memory-mapped item shards."""

    def __init__(self, shard_dir: Path | str):
        self.shard_dir = Path(shard_dir)
        self.manifest = load_manifest(self.shard_dir)
        version = self.manifest.get("format_version", 1)
        if version > FORMAT_VERSION:
            raise ValueError(f"{self.shard_dir} has shard format {version}, newer than this code reads "
                             f"({FORMAT_VERSION}): update the code or rebuild the shards with it")
        self.modality_names = tuple(self.manifest.get("modalities", BUILT_IN_MODALITIES))
        index = np.load(self.shard_dir / "item_index.npy")
        expected = FORMAT1_INDEX_DTYPE if version == 1 else item_index_dtype(self.modality_names)
        if index.dtype != expected or len(index) != self.manifest["num_items"]:
            raise ValueError(f"{self.shard_dir}/item_index.npy does not match the manifest: rebuild the shards")
        self.index = _from_format1(index) if version == 1 else index
        self.modality = self.index["modality"].astype(np.int64)
        self.num_items = len(self.index)
        self._maps: list[mmap.mmap | None] = [None] * len(self.manifest["shards"]["items"])

    def _shard(self, number: int) -> mmap.mmap:
        # Opened lazily so that a store can be pickled into loader workers before first use.
        if self._maps[number] is None:
            path = self.shard_dir / self.manifest["shards"]["items"][number]
            check_file(path, self.manifest)  # in a loader worker too: the store may have been pickled into it
            with open(path, "rb") as f:
                self._maps[number] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[number]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self._maps)
        return state

    def modality_code(self, name: str) -> int:
        if name not in self.modality_names:
            raise KeyError(f"{self.shard_dir} has no modality {name!r} (it has {', '.join(self.modality_names)})")
        return self.modality_names.index(name)

    def has(self, items: np.ndarray | int, name: str) -> np.ndarray:
        """Whether each item carries a payload of modality `name`."""
        self.modality_code(name)
        return self.index[f"{name}_size"][items] > 0

    def payload(self, item: int, name: str) -> memoryview:
        """The item's stored content of modality `name` (a read-only view into the memory-mapped tar)."""
        self.modality_code(name)
        rec = self.index[item]
        size = int(rec[f"{name}_size"])
        if size == 0:
            raise KeyError(f"item {item} has no {name} content in {self.shard_dir} "
                           f"(its modality is {self.modality_names[rec['modality']]})")
        start = int(rec[f"{name}_offset"])
        return memoryview(self._shard(int(rec["shard"])))[start : start + size]


def item_feature_tables(shard_dir: Path, num_items: int) -> dict[str, np.ndarray]:
    """Per item, the first value index of each categorical feature (for side features)."""
    manifest = load_manifest(shard_dir)
    names = sorted(manifest["feature_vocabularies"]["item"])
    tables = {n: np.zeros(num_items, dtype=np.int64) for n in names}
    for shard in manifest["shards"]["items"]:
        with tarfile.open(shard_dir / shard) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    for n in names:
                        tables[n][meta["item"]] = meta["features"][n][0]
    return tables
