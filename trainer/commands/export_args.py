"""Arguments shared by the commands that load an export onto a catalogue (evaluate, recommend, index, serve,
collapse): `export_cli` (--export, --shards, --device) and the `--scoring` / `--prior-beta` options, which choose the
trainer/evaluation/scoring.py `Scoring` they rank with.

    --scoring export       the export's scoring.json (absent: the model's user vector, no prior); the default
    --scoring model        the model's user vector
    --scoring mean         the mean of the history's unit item vectors, by cosine (no user encoder)
    --scoring popularity   popularity alone (no content)
    --prior-beta X         the popularity prior's weight, 0 <= X <= 1e6 (score + X * log(1 + the item's interactions));
                           default: the export's when it scores with the same user vector, else 0 (popularity: 1);
                           evaluate also takes `auto`: chosen on the shards' validation split (scoring.choose_prior)

Commands import this module; the library never does.
"""

from __future__ import annotations

import argparse
import math

import torch

from transrec.trainer.evaluation.scoring import SCORING_CHOICES, Scoring, resolve_scoring

# --prior-beta's largest value: the prior is X * log(1 + count), log(1 + count) < 30 for any catalogue, so scores stay
# far inside float32 (3.4e38; 1e38 overflowed them and the error blamed the export)
MAX_PRIOR_BETA = 1e6


def export_cli(prog: str, doc: str) -> argparse.ArgumentParser:
    """The argument parser of the commands that load an export onto a catalogue (--export, --shards, --device)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="a run's export folder (RUN_DIR/export)")
    p.add_argument("--shards", required=True, help="the catalogue's shards (data_shards.build; any catalogue)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def prior_beta_type(auto: bool):
    """argparse `type` of --prior-beta: a finite number >= 0 (or "auto" when `auto`); anything else is a usage error."""
    def parse(text: str) -> float | str:
        if auto and text == "auto":
            return "auto"
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (0 <= value <= MAX_PRIOR_BETA):  # NaN too
            raise argparse.ArgumentTypeError(f"must be a number >= 0{' or auto' if auto else ''} (the popularity "
                                             f"prior's weight, at most {MAX_PRIOR_BETA:g}: beyond it the prior alone "
                                             "ranks, which --scoring popularity does), got " + repr(text[:40]))
        return value

    return parse


def add_scoring_args(p: argparse.ArgumentParser, auto: bool = False) -> None:
    p.add_argument("--scoring", choices=SCORING_CHOICES, default="export",
                   help="how items are scored: export (default: the export's scoring.json; absent: the model's user "
                        "vector), model (the user encoder), mean (the mean of the history's item vectors, cosine), "
                        "popularity (no content)")
    p.add_argument("--prior-beta", type=prior_beta_type(auto), default=None, metavar="X" + ("|auto" if auto else ""),
                   help="weight of the popularity prior, score + X * log(1 + the item's interactions), X >= 0; "
                        "default: the export's when it uses the same user vector, else 0 (popularity: 1)"
                        + ("; auto: chosen on the shards' validation split" if auto else ""))


def check_scoring_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """The combinations that are wrong whatever the export says: a usage error (exit 2)."""
    if a.scoring == "popularity" and a.prior_beta == 0:
        p.error("argument --prior-beta: --scoring popularity ranks by the prior alone: give a number > 0 (or leave "
                "it out)")
    if a.scoring == "popularity" and a.prior_beta == "auto":
        p.error("argument --prior-beta: auto chooses the prior for content scoring: not with --scoring popularity")


def scoring_from_args(a: argparse.Namespace, export: Scoring) -> Scoring:
    """The Scoring the options `a` ask for over the export's (scoring.resolve_scoring)."""
    return resolve_scoring(a.scoring, a.prior_beta, export)
