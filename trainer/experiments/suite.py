"""The experiments' suite: where each domain's raw data and shards are (built once under OUT/), how a run of a table
is configured (typed changes over the preset, RunConfig), keyed (the resolved configuration and the data's hashes,
trainer/experiments/run_keys.py) and trained or reused from OUT/runs/ (`Suite.ensure`). The tables' driver and the
command line are trainer/experiments/runner.py.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from transrec.data_shards.build import BuildOptions, build
from transrec.data_shards.split_by_release import split_by_release
from transrec.data_shards.split_disjoint import split_disjoint
from transrec.trainer.core.config import Change, RunConfig, changed
from transrec.trainer.core.config_records import read_run_config, to_dict
from transrec.trainer.core.overrides import apply_overrides
from transrec.trainer.core.presets import preset
from transrec.trainer.core.towers import minilm_path
from transrec.trainer.experiments.plans import (
    BUILD_OPTIONS,
    DOMAINS,
    MODEL_CHANGES,
    RELEASE_YEAR,
    SOURCE_OF,
    SOURCE_SEED,
    SPLIT_SEED,
    SPLIT_TARGETS,
    SPLITS,
    TARGETS,
    TRANSFERS,
    RunSpec,
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
