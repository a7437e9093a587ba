"""Command: how alike an export's user vectors are on a catalogue, layer by layer: the diagnosis of a collapsed
user encoder.

    python -m transrec.trainer.commands.collapse --export RUN_DIR/export --shards DIR [--split valid|test] [--users 500]
        [--seed 0]
        [--feature-store DIR] [--out FILE.json] [--device cpu|cuda]

For a seeded sample of the split's evaluated users it reads the state of the last history position (the one the
user vector is taken from) after the user encoder's input normalisation and after each block, and the user vector:
- mean pairwise cosine: 1 when every user gets the same vector. A user encoder transferred to a domain it was not
  trained on can map every history to nearly one vector, and fine-tuning can drive it further toward 1;
- mean share: |mean state|^2 / mean |state|^2, the part of every user's state that is the same for all users;
and of the user vectors:
- effective rank: exp of the entropy of the normalised singular values of the centred user vectors (Roy & Vetterli
  2007), about 1 when they lie on a line and the dimension when they spread evenly;
- same top-10 share: the share of users whose top-10 list (ordered, equal scores broken by item index) is the most
  common one, 1 when every user is shown the same list;
- the spread of scores: the standard deviation of a user's scores over the catalogue (averaged over users) and of
  an item's scores over the users (averaged over items). A collapsed encoder ranks every user's items alike.
The user vectors count as collapsed from a mean pairwise cosine of collapse_diagnostics.COLLAPSE_COSINE (0.85) or a
same top-10 share of COLLAPSE_SAME_TOP10 (0.5) on (collapse_diagnostics.collapse_warning).
"""

from __future__ import annotations

import json
from pathlib import Path

from transrec.data_shards.integrity import IntegrityError
from transrec.data_shards.remote import local_shards
from transrec.trainer.commands.export_args import export_cli
from transrec.trainer.evaluation.collapse_diagnostics import spread_report
from transrec.trainer.evaluation.model_ranker import ranker_from_export


def format_report(report: dict) -> str:
    lines = [f"{report['users']} {report['split']} users, {report['items']} items",
             "| state of the last position | mean pairwise cosine | mean share | mean norm |", "|---|---|---|---|"]
    for name, r in [*report["layers"].items(), ("item vectors (catalogue)", report["item_vectors"])]:
        lines.append(f"| {name} | {r['mean_pairwise_cosine']:.3f} | {r['mean_share']:.3f} | {r['mean_norm']:.3f} |")
    lines.append(f"user vectors: effective rank {report['effective_rank']:.2f}; share of users shown the most "
                 f"common top-10 list {report['same_top10_share']:.3f}")
    lines.append(f"score spread: std over items per user {report['score_std_over_items']:.3f}; std over users per "
                 f"item {report['score_std_over_users']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = export_cli("python -m transrec.trainer.commands.collapse", __doc__)
    p.add_argument("--split", default="valid", choices=["valid", "test"])
    p.add_argument("--users", type=int, default=500, help="how many evaluated users to sample (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--feature-store", default=None, help="the folder of cached frozen-block outputs, if any")
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    a = p.parse_args(argv)
    if a.users < 2:
        p.error("--users must be at least 2")
    shards = Path(local_shards(a.shards))
    if not (shards / "manifest.json").exists():
        raise SystemExit(f"error: no shards at {shards}: build them with `python -m transrec.data_shards.build`")
    try:
        ranker = ranker_from_export(Path(a.export), shards, a.device, feature_store=a.feature_store)
        report = spread_report(ranker, a.split, a.users, a.seed)
    except (FileNotFoundError, ValueError, IntegrityError) as e:
        raise SystemExit(f"error: {e}") from None
    report["export"], report["shards"] = str(a.export), str(a.shards)
    print(format_report(report))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
