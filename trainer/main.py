"""Command: TransRec training (`deepspeed trainer/main.py`); the work is `trainer/training/run.py:train`.

    deepspeed trainer/main.py --ds_config ds_configs/zero2.json [--shards DIR] [--preset cpu-small]
        [--stage {1,2,all}] [--run-dir DIR] [--resume RUN_DIR] [--init-from EXPORT_DIR]
        [--text-encoder PATH] [--image-weights PATH] [--set section.key=value ...]

Multi-GPU and multi-node runs come from the `deepspeed` launcher (`--num_gpus`, `--hostfile`); without CUDA
the trainer uses DeepSpeed's CPU accelerator with gloo. Run `python trainer/main.py --help` for the options.
"""

from __future__ import annotations

import argparse
import os

# `deepspeed trainer/main.py` puts trainer/ first on sys.path, where its module names (config, model, index, ...)
# would shadow any dependency's of that name: run_as_script takes it off. The project imports as `transrec.*`.
try:
    from transrec.trainer.commands.script_path import run_as_script
except ModuleNotFoundError:
    raise SystemExit("error: the transrec package is not installed in this Python: run `make install` (creates .venv) "
                     "or `pip install -e .` from the repository root, then use that environment's deepspeed") from None
run_as_script(__file__, offline=True)

from transrec.data_shards.integrity import IntegrityError  # noqa: E402
from transrec.trainer.commands.launcher_echo import LineParser, error_line_last  # noqa: E402
from transrec.trainer.core.checkpoint import ExportError  # noqa: E402
from transrec.trainer.core.config import RunConfig  # noqa: E402
from transrec.trainer.core.overrides import apply_overrides  # noqa: E402
from transrec.trainer.core.presets import PRESETS, preset  # noqa: E402
from transrec.trainer.evaluation.ranking import NonFiniteScores  # noqa: E402
from transrec.trainer.monitoring.metric_log import TrainingDiverged  # noqa: E402
from transrec.trainer.training.run import RunInputError, RunResult, resumed_config, train  # noqa: E402


def build_parser() -> LineParser:
    """The entry's flags (the design card's `--ds_config`, the run's settings, `--set section.key=value`)."""
    p = LineParser(prog="trainer/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--ds_config",
        "--ds-config",
        dest="ds_config",
        default=None,
        help="DeepSpeed engine config (ZeRO stage, bf16, communication only); default "
        "ds_configs/zero2.json, or with --resume the run's own ds_config.json",
    )
    p.add_argument("--shards", default=None, nargs="+", help="shard folder from data_shards.build, or a mixture of "
                   "several catalogues from data_shards.mixture")
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="default: cpu-small")
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
    return p


def parse_args(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    """The run's configuration from the command line (the preset, the flags, then `--set`), or a resumed run's own."""
    p = build_parser()
    a = p.parse_args(argv)
    if a.shards is not None and len(a.shards) > 1:
        p.exit(2, f"error: --shards names {len(a.shards)} folders: mix them into one first (python -m "
                  f"transrec.data_shards.mixture --out shards/mix {' '.join(a.shards)}), then train with --shards "
                  "shards/mix\n")
    a.shards = a.shards[0] if a.shards else None

    if a.resume:
        given = [f"--{name.replace('_', '-')}" for name in SETTING_FLAGS if getattr(a, name) not in (None, False, [])]
        try:
            return resumed_config(a.resume, given), a
        except RunInputError as e:
            p.exit(2, f"error: {e}\n")
    try:
        cfg = preset(a.preset or "cpu-small")
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


# The flags that set a run's settings: a resumed run keeps the ones it recorded, so with --resume each is refused.
SETTING_FLAGS = ("preset", "shards", "stage", "run_dir", "overwrite", "init_from", "text_encoder", "image_backbone",
                 "image_weights", "item_encoder", "seed", "set")


def main(argv: list[str] | None = None) -> RunResult | None:
    cfg, args = parse_args(argv)
    command = None if argv is None else ["trainer/main.py", *argv]
    try:
        return train(cfg, args.ds_config, overwrite=args.overwrite, command=command)
    except (RunInputError, IntegrityError, ExportError, NonFiniteScores, TrainingDiverged) as e:  # one line
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    with error_line_last():  # under the deepspeed launcher, the `error: ...` line is printed again after its own
        main()
