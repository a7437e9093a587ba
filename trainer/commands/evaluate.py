"""Command: evaluate an export by content on any shards, against popularity.

    python -m transrec.trainer.commands.evaluate --export RUN_DIR/export --shards DIR [--split valid|test] [--out FILE]
        [--include-seen] [--device cpu|cuda] [--scoring export|model|mean|popularity] [--prior-beta X|auto]
        [--max-users N [--sample-seed S]]

evaluates an export by content on any shards (its own run's: the run's test figures; another catalogue's: zero-shot
transfer) without a Trainer, DeepSpeed or TensorBoard; prints the metrics against popularity and writes them to FILE
as JSON, with the per-user ranks beside it: FILE's suffix replaced by .ranks.tsv (the export's, e.g. x.json ->
x.ranks.tsv) and by .popularity.ranks.tsv (popularity's on the same users), both `user, target_item, rank` as a run's
test_ranks*.tsv, for paired comparisons from files. Items are scored as the export's scoring.json says (absent: the
model's user vector), or as --scoring and --prior-beta say (trainer/evaluation/scoring.py); `--prior-beta auto` chooses
the popularity prior's weight on the shards' validation split, then evaluates the split asked for with it. Ranks are
exact over the whole catalogue (trainer/evaluation/ranking.py); the work is trainer/evaluation/export_on_catalogue.py.

The catalogue's item vectors are encoded once, with progress lines on standard error, and kept for later calls of the
same export on the same shards (--vector-cache; trainer/evaluation/item_vector_cache.py); --scoring popularity encodes
nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from transrec.data_shards.integrity import IntegrityError
from transrec.data_shards.remote import local_shards
from transrec.trainer.commands.export_args import add_scoring_args, check_scoring_args, export_cli
from transrec.trainer.evaluation.eval_users import UserSample
from transrec.trainer.evaluation.export_on_catalogue import evaluate_export
from transrec.trainer.evaluation.run_stats import write_ranks
from transrec.trainer.evaluation.scoring import Scoring


def main(argv: list[str] | None = None) -> dict:
    p = export_cli("python -m transrec.trainer.commands.evaluate", __doc__)
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--out", default=None, help="write the metrics as JSON to FILE, and the per-user ranks beside it: "
                   "FILE's suffix replaced by .ranks.tsv (the export's) and .popularity.ranks.tsv (popularity's)")
    p.add_argument("--vector-cache", default="auto", metavar="auto|none|DIR",
                   help="where the catalogue's item vectors are kept between calls (auto: .feature_cache/ beside the "
                   "shards; none: encode every time)")
    p.add_argument("--include-seen", action="store_true", help="keep the user's earlier items in the ranking")
    p.add_argument("--max-users", type=int, default=0, metavar="N",
                   help="rank a seeded uniform sample of N evaluated users (0: all); for catalogues of millions of "
                   "users, where ranking them all takes hours; the result records the sample")
    p.add_argument("--sample-seed", type=int, default=0, help="the seed of --max-users' sample")
    add_scoring_args(p, auto=True)
    a = p.parse_args(argv)
    check_scoring_args(p, a)
    if a.max_users < 0:
        p.error(f"--max-users must be 0 (every evaluated user) or a positive count, not {a.max_users}")
    a.shards = local_shards(a.shards)
    if not (Path(a.shards) / "manifest.json").exists():
        raise SystemExit(f"error: no shards at {a.shards}: build them with `python -m transrec.data_shards.build`")
    try:  # a damaged export or shard, invalid settings, a model giving NaN: one line, exit 1
        sample = UserSample(a.max_users, a.sample_seed) if a.max_users else None
        done = evaluate_export(Path(a.export), Path(a.shards), a.split, not a.include_seen, a.scoring, a.prior_beta,
                               a.device, a.vector_cache, sample=sample)
    except (FileNotFoundError, ValueError, IntegrityError) as e:
        raise SystemExit(f"error: {e}") from None
    result, scoring = done.result, done.scoring
    if done.prior_choice is not None:
        choice = done.prior_choice
        best = next(row for row in choice.table if row["beta"] == scoring.prior_beta)
        print(f"prior chosen on valid: beta {scoring.prior_beta:.4g} (g {best['g']:g} x scale {choice.scale:.4g}); "
              f"valid NDCG@10 {best['ndcg@10']:.4f}, without the prior {choice.table[0]['ndcg@10']:.4f}")
    elif scoring != Scoring():
        print(f"scoring: {scoring.label}")
    iv = result["vs_popularity"]["ndcg@10"]
    sampled = result.get("evaluated_users", {})
    of = f" (a seeded sample of the {sampled['of']:,} evaluated users)" if sampled.get("sampled") else ""
    print(f"{a.split}: {len(done.ranks)} users{of}, {done.num_items} items; content HR@10 "
          f"{result['content']['hr@10']:.4f} NDCG@10 {result['content']['ndcg@10']:.4f}; popularity HR@10 "
          f"{result['popularity']['hr@10']:.4f} NDCG@10 {result['popularity']['ndcg@10']:.4f}; NDCG@10 - popularity "
          f"{iv['diff']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}]")
    if a.out:
        out = Path(a.out)
        out.write_text(json.dumps(result, indent=1))
        write_ranks(out.with_suffix(".ranks.tsv"), done.users.users, done.users.targets, done.ranks)
        write_ranks(out.with_suffix(".popularity.ranks.tsv"), done.users.users, done.users.targets,
                    done.popularity_ranks)
    return result


if __name__ == "__main__":
    main()
