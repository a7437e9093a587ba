"""`make pretrain`: the shipped pre-trained model, a source over every catalogue this project has.

    python -m transrec.trainer.experiments.pretrain [--run-dir runs/pretrained-all] [--epochs 2] \
        [--user-state encoder] [--work .cache/study]

Builds the catalogues of the leave-one-catalogue-out study (trainer/experiments/leave_one_out.py: MovieLens-100k,
MovieLens-1M's first 2,999 users, Amazon Office, both H&M halves; from data/ and ../shared/datasets), mixes them into
one folder (data_shards/mixture.py; no film is dropped: nothing is held out) and trains the study's source
configuration on it. Its export (RUN_DIR/export) is the model to start from on your own catalogue:
`--init-from RUN_DIR/export --set transfer=auto` (docs/your-data.md). What such a source scores zero-shot on a
catalogue it never saw is in reports/leave_one_out.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transrec.data_shards.mixture import Catalogue, mix
from transrec.trainer.experiments.leave_one_out import REPO, prepare, source_config
from transrec.trainer.training.run import train

ALL = ("ml100k", "ml1m", "office", "hm-a", "hm-b")  # ml-old and ml-new are ml100k cut in two: the whole is used


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m transrec.trainer.experiments.pretrain",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=REPO / "runs" / "pretrained-all")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--user-state", default="encoder", choices=["encoder", "mean_residual"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=REPO / ".cache" / "study")
    a = p.parse_args(argv)
    shards = prepare(a.work)
    mixture = a.work / "mixtures" / "all"
    if not (mixture / "manifest.json").exists():
        mix([Catalogue(shards[n], n) for n in ALL], mixture)
    train(source_config(mixture, a.run_dir, a.user_state, a.seed, a.epochs), overwrite=True)
    print(f"pre-trained export: {a.run_dir / 'export'} (start your catalogue from it with --init-from "
          f"{a.run_dir / 'export'} --set transfer=auto)")
    return a.run_dir


if __name__ == "__main__":
    main()
