"""The paper's experiments (tables 2, 4-7) as cached training runs, with Markdown / CSV / PNG reports.

    python -m transrec.trainer.experiments {table2,table4,table5,table6,table7,all} [--quick] [--seeds N] [--out DIR]
        [--data-root DIR | --movielens DIR --hm DIR] [--preset cpu-small|paper|tiny] [--text-encoder PATH]
        [--image-backbone resnet18|efficientnet-lite0] [--targets hm-mixed,hm-image,hm-text-side,ml-mixed]
        [--scaling-target hm-mixed] [--set section.key=value ...] [--set-target section.key=value ...]
        [--models m1,m2] [--report-suffix S] [--plan]

Domains. Source: MovieLens-100k, mixed modality. Targets (no shared users or items): H&M mixed, H&M image only,
H&M text only with user/item side features, and the reverse, very different, transfer: pre-trained on H&M mixed,
fine-tuned on MovieLens mixed. Named with --targets only: H&M half B (mixed, image only, text + side features),
transferred from H&M half A mixed, a source from the same platform that shares no customer or article with it
(`data_shards.split_disjoint`, cut once under OUT/raw/). The shards each domain needs are built once under
OUT/shards/ with `python -m transrec.data_shards.build` (in-process).

Runs. Every run is `trainer.run.train(cfg)` in this process: the same TransRec class, shards, splits, stages,
losses and evaluator for every model. IDRec / IDGru / IDNext = `model.item_encoder=id` with the transformer /
GRU4Rec / NextItNet user encoder; train-from-scratch = TransRec from the towers' generic weights; transfer =
the same with `--init-from` the source run's export (source seed 0, fine-tuned with the same schedule);
zero-shot = the source export evaluated on the target by content with no target training (`--stage none`);
TransRec- = `--stage 2` only; frozen = `model.frozen_towers=true`. TransRec trains with the content softmax
(trainer/core/losses.py) by default; "-paper" models (e.g. `scratch-paper`) with the paper's objectives (free stage-1
head, CPC), which the ID baselines keep. A run is cached in OUT/runs/<config hash>/ (the hash covers the resolved
configuration, the data's input hashes, the text encoder and the source run; a new config field gives every run that
reads it a new key; run_keys.py leaves out the settings a run never reads or that sit at the value reproducing the
behaviour from before they existed) and skipped when asked again; an interrupted run
resumes; a finished run keeps its records, export and overall best model (`prune`). One invocation per OUT at a
time (a lock file).

Table 2's text and image rows evaluate the mixed-trained run's best model on the all-text / all-image shards of the
same users, items and splits (`views.evaluate_view`, evaluation only).

Defaults: table4 uses 3 seeds, the other tables 1 (`--seeds N` sets all). `--quick` = the tiny preset, a tiny
random BERT as text encoder and the bundled data (data/): minutes, for smoke tests only.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from transrec.data_shards.build import BuildOptions, build
from transrec.data_shards.split_by_release import split_by_release
from transrec.data_shards.split_disjoint import split_disjoint
from transrec.trainer.core.config import Change, RunConfig, changed
from transrec.trainer.core.config_records import read_run_config, to_dict
from transrec.trainer.core.overrides import apply_overrides
from transrec.trainer.core.presets import PRESETS, preset
from transrec.trainer.core.towers import minilm_path
from transrec.trainer.experiments import report as er
from transrec.trainer.experiments.plans import (  # noqa: F401  (re-exported: the runner's public names)
    BUILD_OPTIONS,
    DOMAINS,
    MODEL_CHANGES,
    OPT_IN_MODELS,
    PLANS,
    RELEASE_YEAR,
    SOURCE_FRACTIONS,
    SOURCE_OF,
    SOURCE_SEED,
    SPLIT_SEED,
    SPLIT_TARGETS,
    SPLITS,
    TABLE_SETTINGS_TEXT,
    TARGET_FRACTIONS,
    TARGETS,
    TRANSFERS,
    Domain,
    RowPlan,
    RunSpec,
    TablePlan,
    table_settings,
)
from transrec.trainer.experiments.run_keys import drop_settings_that_change_nothing, flat_model_settings
from transrec.trainer.experiments.views import DS_CONFIG, evaluate_view
from transrec.trainer.training.run import train

REPO = Path(__file__).resolve().parents[2]
TABLES = ("table2", "table4", "table5", "table6", "table7")


@dataclass(frozen=True)
class SuiteOptions:
    """An invocation of the experiments (the command line's flags, parse_args; a study builds one directly)."""

    table: str = "all"
    quick: bool = False
    seeds: int | None = None  # seeds per row (None: 3 for table4, 1 otherwise)
    out: str | None = None
    data_root: str | None = None
    movielens: str | None = None
    hm: str | None = None
    preset: str | None = None
    text_encoder: str | None = None
    image_backbone: str | None = None
    targets: str | None = None  # comma-separated
    scaling_target: str = "hm-mixed"
    set: list[str] = field(default_factory=list)  # the command line's --set strings
    set_target: list[str] = field(default_factory=list)
    models: str | None = None  # comma-separated
    report_suffix: str = ""
    study: str = ""
    plan: bool = False

    def __post_init__(self) -> None:
        if self.seeds is not None and self.seeds < 1:
            raise ValueError("--seeds must be >= 1")
        if self.report_suffix and not all(c.isalnum() or c in "_-." for c in self.report_suffix):
            raise ValueError(f"--report-suffix {self.report_suffix!r}: use letters, digits, '_', '-' or '.' only")
        if self.study and not (all(c.isalnum() or c in "_-" for c in self.study)
                               and self.study not in ("runs", "shards", "raw")):
            raise ValueError(f"--study {self.study!r}: a folder name of letters, digits, '_' or '-', not runs, "
                             "shards or raw")


def build_flags(options: dict) -> list[str]:
    """BuildOptions fields as the builder's command-line flags: what a report shows, and what a shard folder's tag
    hashes (the form the experiments first gave them in, so shards built before keep their folders)."""
    return [x for name, value in options.items() for x in (f"--{name.replace('_', '-')}", str(value))]


class Suite:
    """Settings shared by every run of one invocation, the shard and run caches, and run execution."""

    def __init__(self, a: SuiteOptions, changes: Sequence[Change] = ()):
        """`a`: the invocation (parse_args, or a study's own); `changes`: what a study sets for every run beyond the
        tables' settings, applied before the command line's --set."""
        self.quick = a.quick
        self.preset = a.preset or ("tiny" if a.quick else "cpu-small")
        default_out = REPO / "reports" / ("quick" if a.quick else "")
        self.out = Path(a.out or default_out).resolve()
        root = Path(a.data_root) if a.data_root else (REPO / "data" if a.quick else REPO.parent / "shared" / "datasets")
        hm_default = root / "hm-fashion" if (root / "hm-fashion").is_dir() else root / "hm-fashion-fixture"
        self.raw = {"movielens-100k-mm": Path(a.movielens or root / "movielens-100k-mm").resolve(),
                    "hm-fashion": Path(a.hm or hm_default).resolve()}
        self.text_encoder = a.text_encoder or ("tiny-random" if a.quick else None)
        self.image_backbone = a.image_backbone
        self.study_changes = list(changes)
        self.extra = list(a.set or [])
        self.target_extra = list(a.set_target or [])  # target runs only: a transfer's source run keeps its settings
        self.models = [m.strip() for m in a.models.split(",")] if a.models else None
        self.seeds_arg = a.seeds
        self.targets = [t.strip() for t in a.targets.split(",")] if a.targets else list(TARGETS)
        bad = [t for t in self.targets if t not in (*TARGETS, *SPLIT_TARGETS)]
        if bad:
            raise SystemExit(f"--targets: unknown {bad}; choose from {[*TARGETS, *SPLIT_TARGETS]}")
        both = [t for t in self.targets if SOURCE_OF.get(t) in self.targets]
        if self.target_extra and both:
            raise SystemExit(f"--set-target: {both} and their sources {[SOURCE_OF[t] for t in both]} are both targets, "
                             "so a source run would also be a target run; pass --targets without one of each pair")
        self.scaling_target = a.scaling_target
        self.report_suffix = a.report_suffix
        self.report_dir = self.out / a.study if a.study else self.out  # a study's variant reports: OUT/STUDY/
        self.n_boot = 200 if a.quick else 1000
        self.used: dict[str, dict] = {}  # run key -> record, for the reports
        self._keys: dict[RunSpec, str] = {}
        self._manifests: dict[str, dict] = {}

    # -- data -----------------------------------------------------------------------------------------------
    def raw_folder(self, domain: str, make: bool = False) -> Path:
        """The domain's raw tables. A half of a disjoint split lives under OUT/raw/; `make` cuts it from its parent
        folder when it is not there yet (only a shard build needs it)."""
        d = DOMAINS[domain]
        if not d.raw:
            src = self.raw[d.dataset]
            if make and not src.is_dir():
                flag = {"movielens-100k-mm": "--movielens", "hm-fashion": "--hm"}[d.dataset]
                raise SystemExit(f"error: raw data for {d.dataset} not found at {src}: pass --data-root or {flag}")
            return src
        parent_key, half = SPLITS[d.raw]
        parent = self.raw[parent_key]
        by_release = parent_key == "movielens-100k-mm"
        tag = hashlib.sha256(json.dumps([str(parent), RELEASE_YEAR if by_release else SPLIT_SEED]).encode()
                             ).hexdigest()[:8]
        name = f"{parent_key}-release{RELEASE_YEAR}-{tag}" if by_release else f"{parent_key}-split{SPLIT_SEED}-{tag}"
        split = (self.out / "raw").resolve() / name  # resolved: worktrees share raw/
        # the halves themselves, not split_report.json: a clone carries the report (committed) without the halves
        if make and not (split / half).is_dir():
            if not parent.is_dir():
                flag = "--movielens" if by_release else "--hm"
                raise SystemExit(f"error: raw data for {parent_key} (split into {d.raw}) not found at {parent}: pass "
                                 f"--data-root or {flag}")
            if by_release:
                split_by_release(parent, split, year=RELEASE_YEAR)
            else:
                split_disjoint(parent, split, seed=SPLIT_SEED)
        return split / half

    def shards(self, domain: str) -> Path:
        d = DOMAINS[domain]
        src = self.raw_folder(domain)
        tag = hashlib.sha256(json.dumps([str(src), build_flags(BUILD_OPTIONS.get(d.dataset, {}))]).encode()
                             ).hexdigest()[:8]
        out = self.out / "shards" / f"{d.raw or d.dataset}-{d.modality}-{tag}"
        if not (out / "manifest.json").exists():
            build(self.build_options(domain, out))
        return out

    def build_options(self, domain: str, out: Path) -> BuildOptions:
        d = DOMAINS[domain]
        return BuildOptions(dataset=d.dataset, source=self.raw_folder(domain, make=True), out=out,
                            modality=d.modality, **BUILD_OPTIONS.get(d.dataset, {}))

    def build_command(self, domain: str) -> list[str]:
        """`python -m transrec.data_shards.build`'s flags that build the domain's shards (for the reports)."""
        d = DOMAINS[domain]
        return ["--dataset", d.dataset, "--source", str(self.raw_folder(domain)), "--modality", d.modality,
                "--out", str(self.shards(domain)), *build_flags(BUILD_OPTIONS.get(d.dataset, {}))]

    def manifest(self, domain: str) -> dict:
        if domain not in self._manifests:
            self._manifests[domain] = json.loads((self.shards(domain) / "manifest.json").read_text())
        return self._manifests[domain]

    def text_encoder_path(self) -> str | None:
        if self.text_encoder != "tiny-random":
            return self.text_encoder
        path = self.out / "cache" / "tiny-random-bert"
        if not (path / "config.json").exists():
            make_tiny_bert(path)
        return str(path)

    def text_identity(self) -> str:
        enc = self.text_encoder
        if enc is None or enc in ("minilm", "bert-base-random-init"):
            return enc or f"preset default ({self.preset})"
        if enc == "tiny-random":
            return "tiny-random-bert-v1"
        p = Path(enc)
        weights = sorted((f.name, f.stat().st_size) for f in p.glob("*.safetensors")) if p.is_dir() else []
        cfg = (p / "config.json").read_bytes() if (p / "config.json").exists() else b""
        return f"{p.name}:{hashlib.sha256(cfg).hexdigest()[:12]}:{weights}"

    # -- runs -----------------------------------------------------------------------------------------------
    def source_spec(self, spec: RunSpec) -> RunSpec:
        return RunSpec(SOURCE_OF[spec.domain], spec.source_model, SOURCE_SEED, spec.source_fraction)

    def changes(self, spec: RunSpec) -> list[Change]:
        """What the run sets over the preset, paths excluded (init_from, text encoder: see `path_settings`): the
        table settings, the model's own, the run's data and seed, a study's changes, then the command line's --set
        (and --set-target on a target domain's runs)."""
        side_features = DOMAINS[spec.domain].side_features

        def run_settings(c: RunConfig) -> None:
            c.model.side_features, c.data.user_fraction, c.seed = side_features, spec.fraction, spec.seed
            if spec.content:
                c.model.frozen_towers = spec.frozen
                if self.image_backbone:
                    c.model.image.backbone = self.image_backbone

        def command_line(c: RunConfig) -> None:
            apply_overrides(c, self.command_line_settings(spec))

        return [table_settings, *MODEL_CHANGES[spec.model], run_settings, *self.study_changes, command_line]

    def command_line_settings(self, spec: RunSpec) -> list[str]:
        """The invocation's `--set` strings for this run, and its `--set-target` ones on a target domain's runs."""
        return [*self.extra, *(self.target_extra if spec.domain in self.targets else [])]

    def key(self, spec: RunSpec) -> str:
        if spec not in self._keys:
            m = self.manifest(spec.domain)
            canon = {"v": 2, "preset": self.preset, "config": self.resolved_config(spec),
                     "data": {"dataset": m["dataset"], "modality": m["modality"], "inputs": m["input_files"],
                              "items": m["num_items"], "users": m["num_users"], "policies": m["policies"],
                              "interactions": m["num_interactions"], "split": m["split_rule"]},
                     "text_encoder": self.text_identity() if spec.content else None,
                     "source": self.key(self.source_spec(spec)) if spec.model in TRANSFERS else None}
            blob = json.dumps(canon, sort_keys=True).encode()
            self._keys[spec] = hashlib.sha256(blob).hexdigest()[:16]
        return self._keys[spec]

    def resolved_config(self, spec: RunSpec) -> dict:
        """The run's full configuration (preset + overrides), paths left out: a preset whose defaults change gives new
        run keys, so a cached run is reused only when it was trained with exactly these settings."""
        cfg = flat_model_settings(to_dict(changed(preset(self.preset), *self.changes(spec))))
        paths = (("data", "shards"), ("data", "feature_store"), ("model", "text_encoder"), (None, "run_dir"),
                 (None, "init_from"), (None, "resume"))
        for section, key in paths:
            (cfg[section] if section else cfg).pop(key)
        return drop_settings_that_change_nothing(cfg)

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / "runs" / self.key(spec)

    def is_done(self, spec: RunSpec) -> bool:
        rec = self.run_dir(spec) / "runner.json"
        return rec.exists() and json.loads(rec.read_text()).get("status") == "done"

    def path_settings(self, spec: RunSpec) -> Change:
        """The run's settings that name paths on this machine (left out of its key)."""
        text_encoder = self.text_encoder_path() if spec.content else None
        source_export = self.run_dir(self.source_spec(spec)) / "export" if spec.model in TRANSFERS else None

        def change(c: RunConfig) -> None:
            c.data.shards, c.run_dir = str(self.shards(spec.domain)), str(self.run_dir(spec))
            if text_encoder:
                c.model.text.encoder = text_encoder
            if spec.content:  # frozen lower-block outputs, shared by the runs whose frozen weights are equal
                c.data.feature_store = str(self.out / "cache" / "features")
            if source_export is not None:
                c.init_from = str(source_export)

        return change

    def config(self, spec: RunSpec) -> RunConfig:
        return changed(preset(self.preset), *self.changes(spec), self.path_settings(spec))

    def ensure(self, spec: RunSpec, export: bool = False) -> Path:
        """Train the run unless it is cached (resume it when an earlier invocation was interrupted). `export`: the
        run's export is needed (a transfer's source): a cached run without it (a clone carries the records, not the
        weights) trains again."""
        key, d = self.key(spec), self.run_dir(spec)
        if self.is_done(spec) and export and not (d / "export" / "config.json").exists():
            print(f"[experiments] run {key} is cached without its export, which {spec.domain}'s transfer needs: "
                  "training it again", flush=True)
        elif self.is_done(spec):
            self.used.setdefault(key, {**json.loads((d / "runner.json").read_text()), "this_invocation": "cached"})
            return d
        if spec.model in TRANSFERS:
            self.ensure(self.source_spec(spec), export=True)
        resumed = (d / "resume.json").exists() and not (d / "metrics.json").exists()
        print(f"[experiments] {'resuming' if resumed else 'training'} run {key}: {spec}", flush=True)
        t0 = time.time()
        if resumed:
            train(read_run_config(d))  # its own config and ds_config; the lock records this process's argv
        else:
            shutil.rmtree(d, ignore_errors=True)
            train(self.config(spec), str(DS_CONFIG))
        wall = time.time() - t0
        prune(d)
        # the run's configuration is its run_config.json; the record adds how the runner planned it
        record = {"status": "done", "key": key, "spec": spec.__dict__, "preset": self.preset,
                  "command_line_settings": self.command_line_settings(spec), "resumed": resumed,
                  "wall_s": round(wall, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "source_run": self.key(self.source_spec(spec)) if spec.model in TRANSFERS else None}
        (d / "runner.json").write_text(json.dumps(record, indent=1))
        self.used[key] = {**record, "this_invocation": "trained"}
        gc.collect()
        return d

    def ensure_view(self, spec: RunSpec, view: str) -> Path:
        run = self.ensure(spec)
        out = run / "views" / view
        if not (out / "metrics.json").exists():
            t0 = time.time()
            evaluate_view(run, self.shards(view), out)
            meta = json.loads((out / "metrics.json").read_text())
            meta["wall_s"] = round(time.time() - t0, 1)
            (out / "metrics.json").write_text(json.dumps(meta, indent=1))
        return out

    def seeds_for(self, table: str) -> list[int]:
        n = self.seeds_arg if self.seeds_arg is not None else (3 if table == "table4" else 1)
        return list(range(n))


def prune(run_dir: Path) -> None:
    """Disk: a finished run keeps its export and its overall best model; resume checkpoints and the other stage's
    best model go (several hundred MB per content run at cpu-small scale)."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    best = int(json.loads((run_dir / "metrics.json").read_text())["best"]["stage"])
    for f in run_dir.glob("best_stage*.safetensors"):
        if f.name != f"best_stage{best}.safetensors":
            f.unlink()


def make_tiny_bert(path: Path) -> None:
    """A 2-layer, 32-wide BERT with seeded random weights and the MiniLM tokenizer files (`--quick` only)."""
    from transformers import BertConfig, BertModel  # optional: only the tiny BERT of --quick needs transformers here

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64), add_pooling_layer=False).save_pretrained(path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(minilm_path()) / name).exists():
            shutil.copy(Path(minilm_path()) / name, path / name)


# -- results: run every row, then the headline comparisons ---------------------------------------------
def execute(suite: Suite, plan: TablePlan) -> dict[tuple[str, str], er.RowResult]:
    """Run (or load from the cache) every row's runs; ranks, warm / cold split, per-seed metrics."""
    results = {}
    train_cache: dict[str, np.ndarray] = {}
    for row in plan.rows:
        ranks, users, runs, curves, target_items = [], None, [], [], None
        for spec in row.specs:
            d = suite.ensure(spec)
            runs.append(suite.key(spec))
            if row.kind == "popularity":
                path = d / "test_ranks_popularity.tsv"
            elif row.kind == "view":
                path = suite.ensure_view(spec, row.view) / "test_ranks.tsv"
            elif row.kind in ("stage1", "stage2"):
                path = d / f"test_ranks_{row.kind}.tsv"
            else:
                path = d / "test_ranks.tsv"
                curves.append(d / "valid_curve.csv")
            u, t, r = er.read_ranks(path)
            if users is not None and not (np.array_equal(users, u) and np.array_equal(target_items, t)):
                raise ValueError(f"{plan.name} {row.group}/{row.label}: runs disagree on the test users")
            users, target_items = u, t
            ranks.append(r)
        domain = row.specs[0].domain
        if domain not in train_cache:
            train_cache[domain] = er.training_items(suite.shards(domain))
        cold = er.cold_mask(target_items, train_cache[domain])
        arr = np.stack(ranks)
        per_seed = [er.seed_metrics(r, cold) for r in arr]
        results[(row.group, row.label)] = er.RowResult(row, users, arr, cold, runs, per_seed, curves)
    return results


def headline_results(plan: TablePlan, results: dict, n_boot: int) -> dict:
    out = {}
    for group, a, b in plan.headlines:
        ra, rb = results[(group, a)], results[(group, b)]
        if not np.array_equal(ra.users, rb.users):
            raise ValueError(f"{group}: {a} and {b} were evaluated on different users")
        out[(group, a, b)] = {(m, s): er.compare(ra.ranks, rb.ranks, ra.cold, m, s, n=n_boot)
                              for m in ("hr@10", "ndcg@10", "ndcg@20") for s in er.SUBSETS}
    return out


def table_plan(suite: Suite, name: str) -> TablePlan:
    """The table's plan, cut to the rows of `--models` when given, else to the rows of every model but the opt-in
    ones (OPT_IN_MODELS), with the comparisons between the rows kept."""
    plan = PLANS[name](suite)
    if suite.models is None:
        rows = [r for r in plan.rows if not any(s.model in OPT_IN_MODELS for s in r.specs)]
    else:
        known = sorted(set(MODEL_CHANGES))
        unknown = [m for m in suite.models if m not in known]
        if unknown:
            raise SystemExit(f"--models: unknown {unknown}; choose from {known}")
        rows = [r for r in plan.rows if all(s.model in suite.models for s in r.specs)]
    if len(rows) == len(plan.rows):
        return plan
    if not rows:
        raise SystemExit(f"--models {','.join(suite.models)}: no row of {name} is left")
    kept = {(r.group, r.label) for r in rows}
    heads = [h for h in plan.headlines if (h[0], h[1]) in kept and (h[0], h[2]) in kept]
    claims = []
    for c in plan.claims:
        pairs = [p for p in c["pairs"] if (p[0], p[1]) in kept and (p[0], p[2]) in kept]
        if pairs:
            claims.append({**c, "pairs": pairs})
    return replace(plan, rows=rows, headlines=heads, claims=claims)


def run_table(suite: Suite, name: str, command: str) -> Path:
    plan = table_plan(suite, name)
    plan.name += suite.report_suffix  # e.g. table4_3seeds.md beside a one-seed table4.md
    t0 = time.time()
    results = execute(suite, plan)
    heads = headline_results(plan, results, suite.n_boot)
    return er.write_report(suite, plan, results, heads, command, time.time() - t0)


def print_plan(suite: Suite, name: str) -> None:
    plan = table_plan(suite, name)
    specs = {}
    for row in plan.rows:
        for s in row.specs:
            if s.model in TRANSFERS:
                specs[suite.source_spec(s)] = True
            specs[s] = True
    todo = [s for s in specs if not suite.is_done(s)]
    print(f"{name}: {len(specs)} runs, {len(specs) - len(todo)} cached, {len(todo)} to train")
    for s in specs:
        print(f"  {'cached ' if suite.is_done(s) else 'TO RUN '} {suite.key(s)}  {s}")


def parse_args(argv: list[str] | None = None) -> SuiteOptions:
    p = argparse.ArgumentParser(prog="python -m transrec.trainer.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=[*TABLES, "all"])
    p.add_argument("--quick", action="store_true", help="tiny preset, tiny random BERT, bundled data: minutes")
    p.add_argument("--seeds", type=int, default=None, help="seeds per row (default: 3 for table4, 1 otherwise)")
    p.add_argument("--out", default=None,
                   help="reports, CSV, PNG, runs/ and shards/ (default reports/, quick: reports/quick/)")
    p.add_argument("--data-root", default=None,
                   help="folder with movielens-100k-mm/ and hm-fashion/ (default ../shared/datasets; quick: data/)")
    p.add_argument("--movielens", default=None, help="MovieLens-100k-mm raw folder (overrides --data-root)")
    p.add_argument("--hm", default=None, help="H&M raw folder (overrides --data-root)")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="trainer preset (default cpu-small; --quick: tiny)")
    p.add_argument("--text-encoder", default=None,
                   help="minilm | bert-base-random-init | local BERT folder | tiny-random (default: the preset's)")
    p.add_argument("--image-backbone", default=None, choices=["resnet18", "efficientnet-lite0"])
    p.add_argument("--targets", default=None, help=f"comma-separated subset of {','.join(TARGETS)} (tables 4 and 7; "
                   f"default: all of them), or of {','.join(SPLIT_TARGETS)}: H&M half B, transferred from half A, "
                   "which shares no customer or article with it (data_shards/split_disjoint.py)")
    p.add_argument("--scaling-target", default="hm-mixed", choices=[*TARGETS, *SPLIT_TARGETS],
                   help="target of tables 5 and 6")
    p.add_argument("--set", nargs="*", default=[], metavar="section.key=value", help="overrides for every run")
    p.add_argument("--set-target", nargs="*", default=[], metavar="section.key=value",
                   help="overrides for the target domains' runs only (a transfer's source run is left as it is)")
    p.add_argument("--models", default=None,
                   help="only the table's rows of these (e.g. scratch,transfer,transfer-towers)")
    p.add_argument("--report-suffix", default="",
                   help="appended to the report's file names (tableN<suffix>.md, _runs.csv, PNGs); runs are shared")
    p.add_argument("--study", default="",
                   help="write the report, CSV and PNGs under OUT/STUDY/ (a variant of a table, e.g. one study's "
                        "reports together; reports/README.md indexes them); runs and shards stay in OUT")
    p.add_argument("--plan", action="store_true",
                   help="list the runs each table needs and which are cached; train nothing")
    try:
        return SuiteOptions(**vars(p.parse_args(argv)))
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> list[Path]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    a = parse_args(argv)
    suite = Suite(a)
    suite.out.mkdir(parents=True, exist_ok=True)
    names = list(TABLES) if a.table == "all" else [a.table]
    command = "python -m transrec.trainer.experiments " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(suite.out / ".experiments.lock", "w") as lock:  # one invocation per OUT at a time
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: another trainer.experiments is using {suite.out}; wait or pass --out") from None
        if a.plan:
            for name in names:
                print_plan(suite, name)
            return []
        written = [run_table(suite, name, command) for name in names]
    for path in written:
        print(f"[experiments] report: {path}")
    return written

if __name__ == "__main__":
    main()
