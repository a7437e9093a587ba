"""Exports (safetensors + JSON, independent of the number of ranks), --init-from, the best-model file, and resume
points (DeepSpeed checkpoint + RNG states + file hashes + resume.json).

An export holds the towers and the user encoder (no catalogue-specific heads or ID tables), so it loads
into a run on another catalogue. Loading uses safetensors and JSON only: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from transrec.data_shards.integrity import IntegrityError
from transrec.data_shards.tables import file_sha256
from transrec.trainer.core.config import ModelConfig
from transrec.trainer.core.config_records import model_from_dict, model_to_dict
from transrec.trainer.core.modalities import MODALITIES, legacy_model_keys, write_export_files

# Keys an export may lack in a new run without it being a mismatch: catalogue-specific parts.
CATALOGUE_SPECIFIC = ("head.", "id_embedding.", "item_features.", "item_side_proj.", "logit_scale")
# Side-feature modules are built on one domain's feature vocabularies: never carried to another run, so a source
# without side features transfers into a target with them (and back); the target creates its own.
DOMAIN_SPECIFIC = CATALOGUE_SPECIFIC + ("user_features.", "user_side_proj.")
# Model settings that must match for the weights to mean the same thing.
# the model's architecture settings (an export missing one, written before it existed, was made at its default);
# the modalities add theirs (Modality.architecture)
ARCHITECTURE_KEYS = ("d", "item_encoder", "user_encoder", "user_layers", "user_heads", "max_len",
                     "sequence_input_scale")


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_export(model, model_cfg: ModelConfig, out_dir: Path, extra: dict | None = None, write: bool = True) -> Path:
    """Every rank calls this (ZeRO-3 gathers); only `write` ranks write."""
    out_dir = Path(out_dir)
    with gathered(model):
        state = _contiguous(model.export_state()) if write else None
    if not write:
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp / "model.safetensors"))
    meta = {"model": model_to_dict(model_cfg), "format": "transrec-export-1", **(extra or {})}
    meta.update(write_export_files(getattr(model, "towers", {}), model_cfg, tmp))  # e.g. a tokenizer's files
    (tmp / "config.json").write_text(json.dumps(meta, indent=1, default=str))
    write_checkpoint_hashes(tmp)  # every loader verifies the files against these before reading them
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


class ExportError(ValueError):
    """A folder is not a loadable export: files missing, config.json unreadable or its settings invalid."""


EXPORT_FILES = ("config.json", "model.safetensors")


def verify_export(export_dir: Path) -> None:
    """An export's files against the hashes written with it (files.sha256.json), before any is read: IntegrityError
    names a missing, truncated or altered file. An export written before the hashes existed loads with a one-line
    notice that it is unverified."""
    export_dir = Path(export_dir)
    missing = [n for n in EXPORT_FILES if not (export_dir / n).is_file()]
    if missing:
        raise ExportError(f"{export_dir} is not an export: {' and '.join(missing)} missing (a run writes its export to "
                          "RUN_DIR/export; give that folder)")
    verify_hashes(export_dir, "export", "re-export the run (python -m transrec.trainer.main writes RUN_DIR/export) "
                  "or restore the file from a copy", older="exported by an older version")


def read_export_config(export_dir: Path) -> tuple[dict, ModelConfig]:
    """An export's verified config.json and its model settings, checked as a run's settings are: ExportError in one
    line naming the file and the setting."""
    verify_export(export_dir)
    path = Path(export_dir) / "config.json"
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}): re-export the run or restore the file") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise ExportError(f"{path} has no 'model' section: it is not an export's config (re-export the run)")
    known = {f.name for f in dataclasses.fields(ModelConfig)} | set(legacy_model_keys()) | set(MODALITIES)
    unknown = sorted(set(meta["model"]) - known)
    if unknown:
        raise ExportError(f"{path}: unknown model settings {unknown} (written by a newer version? update the code, or "
                          "re-export with this one)")
    try:
        cfg = model_from_dict(meta["model"])
    except (TypeError, ValueError) as e:
        raise ExportError(f"{path}: invalid model settings: {e}") from None
    return meta, cfg


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; an empty, truncated or otherwise unreadable file is one line naming it."""
    try:
        with safe_open(str(path), "pt") as f:
            recorded = (f.metadata() or {}).get(TENSORS_SHA256)
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise IntegrityError(f"{path} cannot be read as safetensors ({first}): it is truncated or damaged; restore it "
                             "or write it again") from None
    if recorded is not None and recorded != tensors_sha256(state):
        raise IntegrityError(f"{path} differs from the hash of its tensors recorded when it was saved (altered on "
                             "disk): restore it or write it again")
    return state


TENSORS_SHA256 = "transrec_tensors_sha256"  # safetensors metadata key: the hash of the file's tensors (names, dtypes,
# shapes, bytes), written with the file in one atomic rename, so a file and its hash can never disagree after a kill


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def reset_prefixes(init_reset: str) -> tuple[str, ...]:
    """The `init_reset` setting ("a.b, c.") as prefixes ("a.b", "c")."""
    return tuple(p.strip().rstrip(".") for p in init_reset.split(",") if p.strip())


def architecture(cfg: ModelConfig) -> dict[str, object]:
    """The settings an export's weights depend on: ARCHITECTURE_KEYS and each modality's (`<modality>.<field>`)."""
    arch = {k: getattr(cfg, k) for k in ARCHITECTURE_KEYS}
    for name, modality in MODALITIES.items():
        arch.update({f"{name}.{f}": getattr(cfg.sections[name], f) for f in modality.architecture})
    return arch


def load_export(model, model_cfg: ModelConfig, export_dir: Path, log=print, parts: str = "all",
                reset: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Load an export into `model`; returns the loaded / newly created / mismatched parameter names.

    `parts`: "all", or only "towers" / "user_encoder" (the rest keeps this run's initialisation). `reset`: parameter
    prefixes as reset_prefixes gives them (whole name components: "user_encoder.blocks.1" is not
    "user_encoder.blocks.10") that keep this run's initialisation too; each must name some tensor that would be
    loaded. Raises on architecture mismatches and on any unexpected missing or extra tensor."""
    export_dir = Path(export_dir)
    _, exported = read_export_config(export_dir)  # verified against its hashes, its settings valid
    source = architecture(exported)
    diffs = {k: (source[k], v) for k, v in architecture(model_cfg).items() if source[k] != v}
    if diffs:
        raise ValueError(
            f"--init-from {export_dir}: architecture differs from this run: {diffs}; "
            "use the same model settings (model.* overrides) as the source run"
        )
    state = read_weights(export_dir / "model.safetensors")
    own = model.state_dict()
    towers = set(getattr(model, "towers", {}))
    exported_towers = {k.split(".")[1] for k in state if k.startswith("towers.")}
    skipped = sorted(exported_towers - towers)  # e.g. an image tower, into a text-only catalogue
    new_towers = tuple(f"towers.{t}." for t in sorted(towers - exported_towers))  # start from their backbones
    loaded = matching_tensors(state, own, export_dir, skipped, new_towers)
    created = [k for k in own if k not in loaded]
    if parts != "all":  # the other parts start as in a run from scratch (checked above all the same)
        kept = [k for k in loaded if k.startswith(f"{parts}.")]
        created += [k for k in loaded if k not in kept]
        loaded = kept
    for prefix in reset:
        hit = [k for k in loaded if k == prefix or k.startswith(prefix + ".")]
        if not hit:
            groups = sorted({".".join(k.split(".")[:3]) for k in loaded})
            raise ValueError(f"init_reset: {prefix!r} names none of the tensors loaded from {export_dir} "
                             f"({parts}); prefixes that do: {groups}")
        created += hit
        reset_here = set(hit)
        loaded = [k for k in loaded if k not in reset_here]
    with gathered(model, modifier_rank=0):
        model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    log(
        f"init-from {export_dir} ({parts}" + (f", reset {list(reset)}" if reset else "")
        + f"): loaded {len(loaded)} tensors; newly created {len(created)}: {tensor_names(created)}; mismatched 0"
        + (f"; towers this catalogue does not use, skipped: {skipped}" if skipped else "")
        + (f"; towers the export lacks, from their backbones: {[t.split('.')[1] for t in new_towers]}"
           if new_towers else "")
    )
    return {"loaded": loaded, "created": created, "mismatched": []}


def matching_tensors(state: dict, own: dict, export_dir: Path, skipped: list[str], new_towers: tuple[str, ...]
                     ) -> list[str]:
    """The exported tensors that load into the model (`own`: its state dict): every one but the domain-specific
    ones and the towers it does not use (`skipped`). ValueError when one does not fit, or when a tensor of the model
    is missing from the export but for the domain-specific ones and the towers the export lacks (`new_towers`)."""
    loaded, mismatched = [], []
    for k, v in state.items():
        if k.startswith(DOMAIN_SPECIFIC) or k.startswith(tuple(f"towers.{t}." for t in skipped)):
            continue
        if k not in own:
            mismatched.append(f"{k} (not in this model)")
        elif own[k].shape != v.shape:
            mismatched.append(f"{k} (export {tuple(v.shape)} vs model {tuple(own[k].shape)})")
        else:
            loaded.append(k)
    unexpected_new = [k for k in own if k not in loaded and not k.startswith(DOMAIN_SPECIFIC + new_towers)]
    if mismatched or unexpected_new:
        raise ValueError(
            f"--init-from {export_dir}: {len(mismatched)} mismatched tensors {mismatched[:5]}, "
            f"{len(unexpected_new)} tensors missing from the export {unexpected_new[:5]}"
        )
    return loaded


def tensor_names(names: list[str], listed: int = 8) -> str:
    """Every tensor of `names`, counted: each name when there are at most `listed`, else the groups they fall in
    (their first two name components) with each group's count, the counts adding up to len(names)."""
    if len(names) <= listed:
        return "[" + ", ".join(sorted(names)) + "]"
    groups: dict[str, int] = {}
    for n in names:
        g = ".".join(n.split(".")[:2])
        groups[g] = groups.get(g, 0) + 1
    return "[" + ", ".join(f"{g}{'.* x' + str(c) if c > 1 or g not in names else ''}"
                           for g, c in sorted(groups.items())) + "]"


def gathered(model, modifier_rank: int | None = None):
    """Full parameters inside the block under ZeRO-3 (a collective: every rank enters); a no-op otherwise."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


def save_model_state(model, path: Path, write: bool = True) -> None:
    """Every rank calls this (ZeRO-3 gathers); only `write` ranks write the file."""
    path = Path(path)
    with gathered(model):
        state = _contiguous(model.state_dict()) if write else None
    if write:
        tmp = path.with_suffix(".partial")
        save_file(state, str(tmp), metadata={TENSORS_SHA256: tensors_sha256(state)})  # the hash travels inside
        tmp.replace(path)


def load_model_state(model, path: Path) -> None:
    """A full model state; the tensors of towers this model does not have (its catalogue does not use them) are
    left out, every tensor the model has must be there. Verified against the hash stored in the file."""
    state = read_weights(Path(path))
    towers = set(getattr(model, "towers", {}))
    state = {k: v for k, v in state.items() if not k.startswith("towers.") or k.split(".")[1] in towers}
    with gathered(model, modifier_rank=0):
        model.load_state_dict(state, strict=True)


# -- resume checkpoints: random generators and file integrity ------------------------------------------
def rng_state() -> dict:
    """Every generator a resumed run must continue: torch CPU, every CUDA device, numpy, Python's."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    # Tensors and numbers only, so that torch.load(weights_only=True) reads it (no arbitrary unpickling).
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def restore_rng(saved) -> None:
    """`rng_state()`'s dict, or the torch CPU state alone (checkpoints written before the dict)."""
    if isinstance(saved, torch.Tensor):
        torch.set_rng_state(saved)
        return
    torch.set_rng_state(saved["torch"])
    n = saved["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = saved["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss_next"]))
    if saved["cuda"] and torch.cuda.is_available():
        if len(saved["cuda"]) != torch.cuda.device_count():
            raise RuntimeError(f"the checkpoint holds CUDA RNG states of {len(saved['cuda'])} devices, this process "
                               f"sees {torch.cuda.device_count()}: resume with the same devices")
        torch.cuda.set_rng_state_all(saved["cuda"])


CHECKPOINT_HASHES = "files.sha256.json"
HASH_FILES = (CHECKPOINT_HASHES, f".{CHECKPOINT_HASHES}.partial")  # the list itself, and its write in progress


def write_checkpoint_hashes(folder: Path) -> None:
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name not in HASH_FILES)
    hashes = {str(f.relative_to(folder)): file_sha256(f) for f in files}
    tmp = folder / f".{CHECKPOINT_HASHES}.partial"
    tmp.write_text(json.dumps(hashes, indent=1))
    tmp.replace(folder / CHECKPOINT_HASHES)


def verify_checkpoint(folder: Path) -> None:
    """Every file of a checkpoint against the hashes written after it was saved: a truncated or altered file is
    named before anything is loaded. Checkpoints written before the hashes existed are loaded as they are."""
    verify_hashes(folder, "checkpoint", "resume cannot continue from it (start the run again, or restore the file)")


def verify_hashes(folder: Path, kind: str, remedy: str, older: str = "written by an older version") -> None:
    """Every file `folder`/files.sha256.json lists against its recorded sha256: IntegrityError in one line naming
    the first missing or differing file, a file the list does not cover (it would be read unverified), or a list that
    is empty or not a map of names to hashes, then `remedy`. A folder without the list (`older`: written before it
    existed) loads with a one-line warning that it is unverified."""
    listed = folder / CHECKPOINT_HASHES
    if not listed.exists():
        logging.getLogger("transrec").warning(f"{folder} has no {CHECKPOINT_HASHES} ({older}): loading it unverified")
        return
    try:
        hashes = json.loads(listed.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise IntegrityError(f"{listed} is damaged (not the JSON of file hashes): {remedy}") from None
    if not isinstance(hashes, dict) or not hashes or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in hashes.items()):
        what = "lists no file" if hashes in ({}, []) or hashes is None else "is not a map of file names to sha256"
        raise IntegrityError(f"{listed} {what}, so nothing could be verified: {remedy}")
    unlisted = sorted(str(f.relative_to(folder)) for f in folder.rglob("*")
                      if f.is_file() and f.name not in HASH_FILES and str(f.relative_to(folder)) not in hashes)
    if unlisted:  # a file added after the hashes were written (e.g. a tokenizer's added_tokens.json) would be read
        raise IntegrityError(f"{kind} file {folder / unlisted[0]} is not listed in {listed} (added after the {kind} "
                             f"was written{f'; {len(unlisted) - 1} more' if len(unlisted) > 1 else ''}): remove it, "
                             f"or {remedy}")
    for name, digest in hashes.items():
        f = folder / name
        if not f.is_file():
            raise IntegrityError(f"{kind} file {f} is missing: the {kind} is incomplete; {remedy}")
        if file_sha256(f) != digest:
            raise IntegrityError(f"{kind} file {f} differs from the sha256 recorded when it was written (truncated or "
                                 f"altered): {remedy}")


# -- resume points ---------------------------------------------------------------------------------------
def barrier() -> None:
    """All ranks wait here (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def save_resume_point(engine, run_dir: Path, rank: int, point: dict,
                      rank_state: dict[str, torch.Tensor] | None = None) -> None:
    """A DeepSpeed checkpoint under a new tag (`point`'s stage, epoch, batches_done), every rank's RNG state (with
    `rank_state`, this rank's own tensors, e.g. the losses not yet logged) and the files' hashes, then resume.json
    naming it (with `point`), then the older tags go: a kill at any moment leaves resume.json pointing at a complete
    checkpoint."""
    ckpt = run_dir / "checkpoints"
    tag = f"stage{point['stage']}-epoch{point['epoch']}-batch{point['batches_done']}"
    engine.save_checkpoint(str(ckpt), tag=tag, save_latest=False)
    torch.save({**rng_state(), **(rank_state or {})}, ckpt / tag / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        write_checkpoint_hashes(ckpt / tag)  # a resume verifies every file before loading any
        tmp = run_dir / "resume.json.partial"
        tmp.write_text(json.dumps({**point, "tag": tag}, indent=1))
        tmp.replace(run_dir / "resume.json")
        for old in ckpt.iterdir():
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    barrier()


# Classes DeepSpeed's checkpoints pickle besides tensors, numbers and containers (ZeRO 0-3, CPU offload): allowed by
# name to the weights-only load below; any other object in a checkpoint file is refused instead of unpickled.
DEEPSPEED_CHECKPOINT_CLASSES = (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                                ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                                ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                                ("deepspeed.utils.tensor_fragment", "fragment_address"))


def weights_only_load(path, map_location=None):
    """torch.load with weights_only=True and DeepSpeed's few checkpoint classes allowed (DeepSpeed's own checkpoint
    engine loads with weights_only=False, which runs whatever a file's pickle says)."""
    allowed = [getattr(importlib.import_module(m), n) for m, n in DEEPSPEED_CHECKPOINT_CLASSES]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)


def load_resume_point(engine, run_dir: Path, tag: str, rank: int) -> dict:
    """The DeepSpeed state and this rank's RNG state of checkpoint `tag`, after verifying every file; nothing is
    unpickled beyond tensors, containers and DeepSpeed's named checkpoint classes. Returns this rank's saved state
    (save_resume_point's `rank_state` among it)."""
    verify_checkpoint(run_dir / "checkpoints" / tag)
    engine.checkpoint_engine.load = weights_only_load  # this engine's loads only (an instance attribute)
    load_path, _ = engine.load_checkpoint(str(run_dir / "checkpoints"), tag=tag)
    if load_path is None:
        raise FileNotFoundError(f"checkpoint {tag} missing in {run_dir / 'checkpoints'}: cannot resume")
    saved = torch.load(run_dir / "checkpoints" / tag / f"rng_rank{rank}.pt", weights_only=True)
    restore_rng(saved)
    return saved if isinstance(saved, dict) else {}
