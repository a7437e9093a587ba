"""The `--scoring` and `--prior-beta` options of the commands that rank with an export (recommend, serve, evaluate):
which trainer/scoring.py `Scoring` they use.

    --scoring export       the export's scoring.json (absent: the model's user vector, no prior); the default
    --scoring model        the model's user vector
    --scoring mean         the mean of the history's unit item vectors, by cosine (no user encoder)
    --scoring popularity   popularity alone (no content)
    --prior-beta X         the popularity prior's weight, X >= 0 (score + X * log(1 + the item's interactions));
                           default: the export's when it scores with the same user vector, else 0 (popularity: 1);
                           evaluate also takes `auto`: chosen on the shards' validation split (scoring.choose_prior)
"""

from __future__ import annotations

import argparse
import math

from transrec.trainer.scoring import FLOAT32_MAX, Scoring

SCORING_CHOICES = ("export", "model", "mean", "popularity")

USER_OF = {"model": "model", "mean": "mean", "popularity": "none"}  # --scoring -> Scoring.user


def prior_beta_type(auto: bool):
    """argparse `type` of --prior-beta: a finite number >= 0 (or "auto" when `auto`); anything else is a usage error."""
    def parse(text: str) -> float | str:
        if auto and text == "auto":
            return "auto"
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (0 <= value <= FLOAT32_MAX):  # NaN too; the scores are float32
            raise argparse.ArgumentTypeError(f"must be a number >= 0{' or auto' if auto else ''} (the popularity "
                                             f"prior's weight, at most {FLOAT32_MAX:.3g}), got {text[:40]!r}")
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


def user_and_beta(a: argparse.Namespace, export: Scoring) -> tuple[str, float | str]:
    """(Scoring.user, prior beta or "auto") of the options `a` over the export's scoring `export`."""
    user = export.user if a.scoring == "export" else USER_OF[a.scoring]
    if a.prior_beta is not None:
        return user, a.prior_beta
    if user == export.user:
        return user, export.prior_beta
    return user, 1.0 if user == "none" else 0.0


def scoring_from_args(a: argparse.Namespace, export: Scoring) -> Scoring:
    """The Scoring the options `a` ask for (not "auto"); ValueError naming the problem when it is not valid with the
    export's scoring (e.g. an export scoring by popularity alone and --prior-beta 0)."""
    user, beta = user_and_beta(a, export)
    if beta == "auto":
        raise ValueError("--prior-beta auto is for evaluate only")
    try:
        return Scoring(user, float(beta))
    except ValueError as e:
        raise ValueError(f"--scoring {a.scoring} --prior-beta {beta}: {e}") from None
