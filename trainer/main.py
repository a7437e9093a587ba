"""TransRec training entry point.

    deepspeed trainer/main.py --ds_config ds_configs/zero2.json [--shards DIR] [--preset cpu-small]
        [--stage {1,2,all}] [--run-dir DIR] [--resume RUN_DIR] [--init-from EXPORT_DIR]
        [--text-encoder PATH] [--image-weights PATH] [--set section.key=value ...]

Multi-GPU and multi-node runs come from the `deepspeed` launcher (`--num_gpus`, `--hostfile`); without CUDA
the trainer uses DeepSpeed's CPU accelerator with gloo. Run `python trainer/main.py --help` for the options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# `deepspeed trainer/main.py` puts trainer/ first on sys.path, where its module names (config, model, index, ...)
# would shadow any dependency's of that name: take it off. The project imports as `transrec.*` (setup.py).
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
try:
    import transrec.trainer  # noqa: F401
except ModuleNotFoundError:
    raise SystemExit("error: the transrec package is not installed in this Python: run `make install` (creates .venv) "
                     "or `pip install -e .` from the repository root, then use that environment's deepspeed") from None
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transrec.data_shards.integrity import IntegrityError  # noqa: E402
from transrec.data_shards.remote import local_shards  # noqa: E402
from transrec.trainer.checkpoint import ExportError, read_export_config  # noqa: E402
from transrec.trainer.config import RunConfig, apply_overrides, preset, read_run_config  # noqa: E402
from transrec.trainer.evaluate import NonFiniteScores  # noqa: E402
from transrec.trainer.run_lock import claim_run_dir, releasing_run_dir_locks  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="trainer/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ds_config",
        "--ds-config",
        dest="ds_config",
        default=None,
        help="DeepSpeed engine config (ZeRO stage, bf16, communication only); default "
        "ds_configs/zero2.json, or with --resume the run's own ds_config.json",
    )
    p.add_argument("--shards", default=None, help="shard folder from data_shards.build")
    p.add_argument("--preset", default="cpu-small", choices=["cpu-small", "paper", "tiny"])
    p.add_argument("--stage", default=None, choices=["1", "2", "all", "none"],
                   help="1, 2 or all (default: all); none: no training, evaluate the initial model by content "
                        "(with --init-from: zero-shot transfer)")
    p.add_argument("--run-dir", default=None, help="run folder (default: a new folder under runs/); an existing "
                   "non-empty one is refused unless --resume or --overwrite")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --run-dir first")
    p.add_argument("--resume", default=None, help="continue the run in RUN_DIR exactly where it stopped")
    p.add_argument("--init-from", default=None, help="start from an export folder (RUN_DIR/export)")
    p.add_argument("--text-encoder", default=None, help="'minilm', 'bert-base-random-init' or a local HF BERT folder")
    p.add_argument("--image-backbone", default=None, choices=["resnet18", "efficientnet-lite0"])
    p.add_argument("--image-weights", default=None, help="local weights (.pth / .safetensors) for the image backbone")
    p.add_argument("--item-encoder", default=None, choices=["content", "id"], help="id = the IDRec baseline")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="section.key=value",
        help="config overrides, e.g. stage1.epochs=3 model.stage1_relu=true eval.exclude_seen=false",
    )
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS
    )
    a = p.parse_args(argv)

    if a.resume:
        record = Path(a.resume) / "run_config.json"
        if not record.exists():
            p.error(f"--resume {a.resume}: no run_config.json there; is it a run directory?")
        return read_run_config(a.resume), a
    try:
        cfg = preset(a.preset)
        direct = {
            "model.text_encoder": a.text_encoder,
            "model.image_backbone": a.image_backbone,
            "model.image_weights": a.image_weights,
            "model.item_encoder": a.item_encoder,
            "data.shards": a.shards,
            "stages": a.stage,
            "run_dir": a.run_dir,
            "init_from": a.init_from,
            "seed": None if a.seed is None else str(a.seed),
        }
        overrides = [f"{k}={v}" for k, v in direct.items() if v is not None] + list(a.set)
        cfg = apply_overrides(cfg, overrides)
    except ValueError as e:
        p.exit(2, f"error: {e}\n")  # one line naming the setting (argparse's usage text would bury it)
    return cfg, a


def check_run_dir(cfg: RunConfig, overwrite: bool, argv: list[str] | None = None) -> None:
    """One writer per run folder, and a new run never writes into an old run's folder (its best models and
    resume.json could be picked up). Rank 0 locks RUN_DIR (trainer/run_lock.py: a run, --overwrite or --resume into a
    folder another live run holds is refused, naming it) before anything is written there; then a new run refuses a
    non-empty folder unless --overwrite, which empties it. The other ranks wait for that outcome. Without --run-dir,
    rank 0 names the new folder under runs/ here. The lock is held until main() returns or raises."""
    import shlex

    from transrec.trainer.run_setup import default_run_dir, setup_distributed

    rank, world, _ = setup_distributed()
    command = shlex.join(sys.argv if argv is None else ["trainer/main.py", *argv])
    run_dir = claim_run_dir(Path(cfg.run_dir or default_run_dir(cfg)), rank, world, new_run=not cfg.resume,
                            overwrite=overwrite, command=command)
    cfg.run_dir = str(run_dir)


@releasing_run_dir_locks  # the run directory's lock (check_run_dir) ends with the call
def main(argv: list[str] | None = None) -> dict | None:
    cfg, args = parse_args(argv)
    cfg.data.shards = local_shards(cfg.data.shards)
    if not (Path(cfg.data.shards) / "manifest.json").exists():
        raise SystemExit(
            f"error: no shards at {cfg.data.shards}: build them with `python -m transrec.data_shards.build "
            f"--dataset movielens-100k-mm --source data/movielens-100k-mm --modality mixed "
            f"--out {cfg.data.shards}` (or `make shards`)"
        )
    check_run_dir(cfg, args.overwrite, argv)
    ds_config = args.ds_config or (str(Path(cfg.resume) / "ds_config.json") if cfg.resume else "ds_configs/zero2.json")
    try:
        return run(cfg, ds_config)
    except (IntegrityError, ExportError, NonFiniteScores) as e:  # a damaged file or a broken model: one line
        raise SystemExit(f"error: {e}") from None


def run(cfg: RunConfig, ds_config: str) -> dict | None:
    """Train (or evaluate, --stage none) as `cfg` says; `transfer=auto` trains its candidates and keeps the best."""
    if cfg.init_from:  # before anything trains: a folder that is not an export, or a damaged one, is named now
        read_export_config(Path(cfg.init_from))
    if cfg.transfer.mode == "auto":  # candidates under RUN_DIR/candidates/, chosen on validation
        from transrec.trainer.transfer import run_auto

        return run_auto(cfg, ds_config)
    from transrec.trainer.train import Trainer

    resume_point = None
    if cfg.resume:
        point_file = Path(cfg.resume) / "resume.json"
        if not point_file.exists():
            raise SystemExit(f"error: {point_file} not found: the run saved no checkpoint yet; start it again")
        resume_point = json.loads(point_file.read_text())
    trainer = Trainer(cfg, ds_config, resume_state=resume_point["state"] if resume_point else None)
    return trainer.run(resume_point)


if __name__ == "__main__":
    main()
