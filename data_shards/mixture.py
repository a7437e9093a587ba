"""Several catalogues' shard folders -> one mixture folder that a run trains on, each catalogue kept apart.

    python -m transrec.data_shards.mixture --out shards/mix shards/ml1m-text shards/amazon-office-text \
        [--names ml1m,office] [--drop ml1m=films.txt]

The mixture is an ordinary shard folder (same format, verified by the same hashes), so every reader, the loader, the
feature cache, ZeRO and exact resume work on it unchanged. What makes it a mixture is `manifest["catalogues"]`: each
catalogue's items are one contiguous range of item indices and its users one contiguous range of user indices, in the
order given. The trainer reads those ranges (`catalogue_bounds`) to score every training sequence against its own
catalogue's items only and to validate each catalogue on its own (trainer/training/catalogue_mixture.py).

Item and user raw ids become `NAME/raw id`. Side features are not carried (each catalogue has its own vocabularies;
`feature_vocabularies` is empty). The text tokenizer must be the same in every catalogue (the towers are shared).

`--drop NAME=FILE` removes the items whose raw ids FILE lists (one per line) from catalogue NAME before mixing, with
every interaction that names them, and splits each user's remaining history again by the catalogue's own rule (the
last two interactions are validation and test when at least `min_interactions` are left); users left with nothing
are dropped. Leave-one-catalogue-out studies use it to keep a target's films out of every source. Every removed item,
interaction and user is counted in the manifest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transrec.data_shards import report
from transrec.data_shards.integrity import FIXED_FILES, hash_files, remember
from transrec.data_shards.shard_io import (
    FORMAT_VERSION,
    DeterministicTarWriter,
    ItemStore,
    item_index_dtype,
    load_manifest,
    read_id_maps,
    read_sequences,
)

ITEMS_PER_SHARD, USERS_PER_SHARD = 2000, 1000
MIXTURE_RULE = ("catalogues concatenated in the order given: each catalogue's items and users are contiguous index "
                "ranges (manifest['catalogues']); raw ids prefixed 'NAME/'; side features not carried")


@dataclass
class Catalogue:
    """One source folder of a mixture: its name in the mixture and the raw item ids to leave out of it."""

    path: Path
    name: str
    drop_items: set[str] = field(default_factory=set)


def catalogue_bounds(manifest: dict) -> np.ndarray | None:
    """[C + 1] item-index offsets of a mixture's catalogues (catalogue c owns items [b[c], b[c + 1])); None for a
    folder of one catalogue."""
    cats = manifest.get("catalogues")
    if not cats:
        return None
    return np.asarray([cats[0]["items"][0], *(c["items"][1] for c in cats)], dtype=np.int64)


def user_bounds(manifest: dict) -> np.ndarray | None:
    """[C + 1] user-index offsets of a mixture's catalogues; None for one catalogue."""
    cats = manifest.get("catalogues")
    if not cats:
        return None
    return np.asarray([cats[0]["users"][0], *(c["users"][1] for c in cats)], dtype=np.int64)


def catalogue_names(manifest: dict) -> list[str]:
    return [c["name"] for c in manifest.get("catalogues") or []]


def _check_compatible(manifests: list[dict], cats: list[Catalogue]) -> None:
    vocab = {m["text"]["tokenizer"]["vocab_hash"] for m in manifests}
    if len(vocab) > 1:
        raise ValueError("the catalogues were tokenized with different vocabularies ("
                         + ", ".join(f"{c.name}: {m['text']['tokenizer'].get('path_name')}" for c, m in
                                     zip(cats, manifests))
                         + "): the towers are shared, so rebuild them with one --tokenizer")
    if len({c.name for c in cats}) != len(cats):
        raise ValueError(f"catalogue names must differ: {[c.name for c in cats]} (give --names)")
    nested = [c.name for c, m in zip(cats, manifests) if m.get("catalogues")]
    if nested:
        raise ValueError(f"{nested[0]} is a mixture already: mix the single-catalogue folders it was made from")


def _copy_items(cat: Catalogue, store: ItemStore, keep: np.ndarray, names: list[str], first_index: int,
                writer_for, index: np.ndarray) -> None:
    """Every kept item's tar members under its new key, its payload offsets re-pointed into the new tars."""
    remap_code = np.asarray([names.index(n) for n in store.modality_names], dtype=np.int8)
    new_of_old = np.full(store.num_items, -1, dtype=np.int64)
    new_of_old[keep] = first_index + np.arange(len(keep))
    for shard in store.manifest["shards"]["items"]:
        with tarfile.open(store.shard_dir / shard) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            by_key: dict[int, list[tarfile.TarInfo]] = {}
            for m in members:
                by_key.setdefault(int(m.name.split(".", 1)[0]), []).append(m)
            for old in sorted(by_key):
                new = int(new_of_old[old])
                if new < 0:
                    continue
                writer, tar_number = writer_for(new)
                row, old_row = index[new], store.index[old]
                row["shard"], row["modality"] = tar_number, remap_code[old_row["modality"]]
                data_at = {}
                for m in by_key[old]:
                    data = tar.extractfile(m).read()
                    suffix = m.name.split(".", 1)[1]
                    if suffix == "json":
                        meta = json.loads(data)
                        meta.update(item=new, raw_id=f"{cat.name}/{meta['raw_id']}", features={})
                        data = json.dumps(meta, sort_keys=True).encode()
                    data_at[m.offset_data] = (writer.add(f"{new:08d}.{suffix}", data), m.size)
                for name in store.modality_names:
                    size = int(old_row[f"{name}_size"])
                    if size:
                        start = int(old_row[f"{name}_offset"])
                        member_at = max(o for o in data_at if o <= start)
                        new_at, member_size = data_at[member_at]
                        if start + size > member_at + member_size:
                            raise ValueError(f"{store.shard_dir}: item {old}'s {name} payload lies outside its tar "
                                             "member: rebuild that catalogue's shards")
                        row[f"{name}_offset"], row[f"{name}_size"] = new_at + (start - member_at), size


class _ItemWriters:
    """Item tars of ITEMS_PER_SHARD items each, opened as the new item indices reach them."""

    def __init__(self, tmp: Path):
        self.tmp, self.names, self.writer = tmp, [], None

    def __call__(self, new: int) -> tuple[DeterministicTarWriter, int]:
        number = new // ITEMS_PER_SHARD
        while len(self.names) <= number:
            if self.writer is not None:
                self.writer.close()
            self.names.append(f"items-{len(self.names):06d}.tar")
            self.writer = DeterministicTarWriter(self.tmp / self.names[-1])
        return self.writer, number

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def resplit(items: list[int], timestamps: list[float], min_interactions: int) -> tuple[int, bool]:
    """(num_train, evaluated) of a history by the builders' split rule: the last two are validation and test when the
    user has at least `min_interactions`."""
    evaluated = len(items) >= min_interactions
    return (len(items) - 2 if evaluated else len(items)), evaluated


def mix(cats: list[Catalogue], out: Path) -> dict:
    """Write the mixture folder `out` (replaced only once complete); returns its manifest. One catalogue is allowed:
    the catalogue with its drops applied, trained and validated as any mixture (a smaller source of a study)."""
    if not cats:
        raise ValueError("a mixture needs one or more catalogues")
    manifests = [load_manifest(c.path) for c in cats]
    _check_compatible(manifests, cats)
    stores = [ItemStore(c.path) for c in cats]
    names: list[str] = []
    for s in stores:
        names += [n for n in s.modality_names if n not in names]
    id_maps = [read_id_maps(c.path) for c in cats]
    unknown = {c.name: sorted(c.drop_items - set(m["items"]))[:3] for c, m in zip(cats, id_maps)}
    unknown = {k: v for k, v in unknown.items() if v}
    if unknown:
        name, ids = next(iter(unknown.items()))
        raise ValueError(f"--drop {name}: raw item ids not in that catalogue, e.g. {ids}: check the file")

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    keeps = [np.flatnonzero([raw not in c.drop_items for raw in m["items"]]) for c, m in zip(cats, id_maps)]
    total = sum(len(k) for k in keeps)
    index = np.zeros(total, dtype=item_index_dtype(names))
    writers, item_ids, tars = _ItemWriters(tmp), [], SequenceTars(tmp)
    entries = []
    first_item = first_user = 0
    for cat, man, store, keep, ids in zip(cats, manifests, stores, keeps, id_maps):
        print(f"mixing {cat.name}: {len(keep)} of {store.num_items} items", file=sys.stderr)
        _copy_items(cat, store, keep, names, first_item, writers, index)
        item_ids += [f"{cat.name}/{ids['items'][i]}" for i in keep]
        new_of_old = np.full(store.num_items, -1, dtype=np.int64)
        new_of_old[keep] = first_item + np.arange(len(keep))
        first_tar = len(tars.names)
        kept, interactions, dropped_inter, evaluated = mix_users(cat, man, new_of_old, first_user, tars)
        entries.append({
            "name": cat.name, "source": str(cat.path), "dataset": man["dataset"], "modality": man["modality"],
            "items": [first_item, first_item + len(keep)], "users": [first_user, first_user + kept],
            "sequence_shards": tars.names[first_tar:],
            "num_interactions": interactions, "num_users_evaluated": evaluated,
            "dropped": {"items": int(store.num_items - len(keep)), "interactions": dropped_inter,
                        "users": man["num_users"] - kept},
            "modality_rule": man["modality_rule"], "text_template": man["text"]["template"],
            "max_tokens": man["text"]["max_tokens"], "policies": man["policies"],
        })
        first_item += len(keep)
        first_user += kept
    writers.close()
    tars.close()
    np.save(tmp / "item_index.npy", index, allow_pickle=False)
    (tmp / "id_maps.json").write_text(json.dumps({"items": item_ids, "users": tars.user_ids}))
    manifest = describe(cats, manifests, entries, names, index, writers.names, tars.names, tars.train_lengths,
                        tars.records)
    return publish(tmp, out, manifest, manifests, cats)


def mix_users(cat: Catalogue, man: dict, new_of_old: np.ndarray, first_user: int, tars: SequenceTars
              ) -> tuple[int, int, int, int]:
    """One catalogue's users into the mixture's tars, numbered from `first_user`, their items renumbered by
    `new_of_old` (-1: a dropped item, left out; a user left with none is dropped; a user who lost items is split
    again by `resplit`). Returns (users kept, their interactions, interactions dropped, users evaluated)."""
    min_inter = man["policies"]["min_interactions"]
    interactions = kept = dropped_inter = evaluated = 0
    for s in read_sequences(cat.path):
        mapped = new_of_old[np.asarray(s["items"], dtype=np.int64)]
        real = mapped >= 0
        dropped_inter += int((~real).sum())
        if not real.any():
            continue
        items = mapped[real].tolist()
        times = [t for t, r in zip(s["timestamps"], real) if r]
        num_train, is_eval = (s["num_train"], s["evaluated"]) if real.all() else resplit(items, times, min_inter)
        tars.add({"user": first_user + kept, "raw_id": f"{cat.name}/{s['raw_id']}", "items": items,
                  "timestamps": times, "num_train": num_train, "evaluated": is_eval, "features": {}},
                 new_tar=kept % USERS_PER_SHARD == 0)  # a catalogue's users start a tar: a tar, one catalogue
        kept += 1
        evaluated += is_eval
        interactions += len(items)
    return kept, interactions, dropped_inter, evaluated


class SequenceTars:
    """The mixture's sequence tars, written user by user, and what its manifest needs of them: the tar names, each
    tar's histogram of training lengths, every user's items and raw id."""

    def __init__(self, folder: Path):
        self.folder, self.names, self.train_lengths = folder, [], {}
        self.records, self.user_ids = [], []
        self._writer: DeterministicTarWriter | None = None

    def add(self, sample: dict, new_tar: bool) -> None:
        """One user's sample, into a new tar when `new_tar` (or when none is open)."""
        if new_tar or self._writer is None:
            self.close()
            self.names.append(f"sequences-{len(self.names):06d}.tar")
            self._writer = DeterministicTarWriter(self.folder / self.names[-1])
        self._writer.add(f"{sample['user']:08d}.json", json.dumps(sample, sort_keys=True).encode())
        hist = self.train_lengths.setdefault(self.names[-1], {})
        hist[str(sample["num_train"])] = hist.get(str(sample["num_train"]), 0) + 1
        self.records.append({"items": sample["items"]})
        self.user_ids.append(sample["raw_id"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def describe(cats, manifests, entries, names, index, item_tars, seq_tars, train_lengths, records) -> dict:
    item_mod = index["modality"].astype(np.int64)
    counts = {}
    for m in manifests:
        for k, v in m["validation"].items():
            counts[k] = counts.get(k, 0) + v
    dropped = {}
    for m in manifests:
        for k, v in m["dropped_interactions"].items():
            dropped[k] = dropped.get(k, 0) + v
    dropped["dropped_from_mixture"] = sum(e["dropped"]["interactions"] for e in entries)
    return {
        "format_version": FORMAT_VERSION,
        "modalities": names,
        "dataset": "mixture",
        "modality": "+".join(sorted({m["modality"] for m in manifests})),
        "seed": 0,
        "num_users": sum(e["users"][1] - e["users"][0] for e in entries),
        "num_users_evaluated": sum(e["num_users_evaluated"] for e in entries),
        "num_items": len(index),
        "num_interactions": sum(e["num_interactions"] for e in entries),
        "items_by_modality": {n: int((item_mod == k).sum()) for k, n in enumerate(names)},
        "modality_fallbacks": {"count": sum(m["modality_fallbacks"]["count"] for m in manifests), "items": []},
        "id_maps": "id_maps.json",
        "item_index": "item_index.npy",
        "feature_vocabularies": {"user": {}, "item": {}},
        "ordering_rule": manifests[0]["ordering_rule"],
        "split_rule": manifests[0]["split_rule"],
        "modality_rule": "; ".join(f"{e['name']}: {e['modality_rule']}" for e in entries),
        "mixture_rule": MIXTURE_RULE,
        "text": {"template": "per catalogue (catalogues[].text_template)",
                 "max_tokens": max(m["text"]["max_tokens"] for m in manifests),
                 "tokenizer": manifests[0]["text"]["tokenizer"]},
        "policies": {
            "dedup": "per catalogue",
            "duplicate_interactions": sum(m["policies"]["duplicate_interactions"] for m in manifests),
            "duplicates_removed": sum(m["policies"]["duplicates_removed"] for m in manifests),
            "min_interactions": min(m["policies"]["min_interactions"] for m in manifests),
            "users_below_min": sum(e["users"][1] - e["users"][0] - e["num_users_evaluated"] for e in entries),
        },
        "dropped_interactions": dropped,
        "validation": counts,
        "input_files": {f"{c.name}/{k}": v for c, m in zip(cats, manifests) for k, v in m["input_files"].items()},
        "shards": {"items": item_tars, "sequences": seq_tars},
        "sequence_shard_train_lengths": train_lengths,
        "statistics": report.statistics(records, item_mod, names),
        "catalogues": entries,
    }


def publish(tmp: Path, out: Path, manifest: dict, manifests: list[dict], cats: list[Catalogue]) -> dict:
    shards = manifest["shards"]
    hashed = hash_files(tmp, [*shards["items"], *shards["sequences"], *FIXED_FILES])
    manifest["file_sha256"] = {n: digest for n, (_, digest) in hashed.items()}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    found = {}
    for c in cats:
        source = json.loads((c.path / "validation.json").read_text()).get("found", {})
        for k, v in source.items():
            found.setdefault(k, []).extend({"catalogue": c.name, **d} for d in v)
    (tmp / "validation.json").write_text(json.dumps({"counts": manifest["validation"], "found": found}, indent=1,
                                                    default=str))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    remember(out, hashed)
    return manifest


def summary(manifest: dict) -> str:
    lines = [f"| {'catalogue':<20} | {'items':>7} | {'users':>7} | {'interactions':>12} | dropped (items / "
             "interactions / users) |", f"|{'-' * 22}|{'-' * 9}|{'-' * 9}|{'-' * 14}|{'-' * 39}|"]
    for e in manifest["catalogues"]:
        d = e["dropped"]
        lines.append(f"| {e['name']:<20} | {e['items'][1] - e['items'][0]:>7} | {e['users'][1] - e['users'][0]:>7} | "
                     f"{e['num_interactions']:>12} | {d['items']} / {d['interactions']} / {d['users']} |")
    return "\n".join(lines)


def parse_drop(values: list[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: --drop {v!r}: write --drop NAME=FILE (FILE: raw item ids, one per line)")
        try:
            ids = {line.strip() for line in Path(path).read_text().splitlines() if line.strip()}
        except OSError as e:
            raise SystemExit(f"error: --drop {name}: cannot read {path} ({e.strerror}): give a file of raw item "
                             "ids") from None
        out.setdefault(name, set()).update(ids)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m transrec.data_shards.mixture", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", nargs="+", type=Path, help="the catalogues' shard folders, in mixture order")
    p.add_argument("--out", required=True, type=Path, help="the mixture folder to write")
    p.add_argument("--names", default="", help="comma-separated catalogue names (default: the folders' names)")
    p.add_argument("--drop", action="append", default=[], metavar="NAME=FILE",
                   help="leave FILE's raw item ids (one per line) out of catalogue NAME")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.names.split(",")] if a.names else [s.name for s in a.shards]
    if len(names) != len(a.shards):
        p.error(f"--names gives {len(names)} names for {len(a.shards)} shard folders")
    drops = parse_drop(a.drop)
    unknown = sorted(set(drops) - set(names))
    if unknown:
        p.error(f"--drop names {unknown}, which is no catalogue of this mixture ({', '.join(names)})")
    missing = [s for s in a.shards if not (s / "manifest.json").exists()]
    if missing:
        p.error(f"{missing[0]} is no shard folder (no manifest.json): build it with python -m "
                "transrec.data_shards.build first")
    try:
        manifest = mix([Catalogue(s, n, drops.get(n, set())) for s, n in zip(a.shards, names)], a.out)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(summary(manifest))
    print(f"mixture written to {a.out}")


if __name__ == "__main__":
    main()
