"""How alike an export's user vectors are on a catalogue, layer by layer: the diagnosis of a collapsed user encoder.

    python -m transrec.trainer.collapse --export RUN_DIR/export --shards DIR [--split valid|test] [--users 500]
        [--seed 0]
        [--feature-store DIR] [--out FILE.json] [--device cpu|cuda]

For a seeded sample of the split's evaluated users it reads the state of the last history position (the one the
user vector is taken from) after the user encoder's input normalisation and after each block, and the user vector:
- mean pairwise cosine: 1 when every user gets the same vector. A user encoder transferred to a domain it was not
  trained on can map every history to nearly one vector, and fine-tuning can drive it further toward 1;
- mean share: |mean state|^2 / mean |state|^2, the part of every user's state that is the same for all users;
and the spread of scores: the standard deviation of a user's scores over the catalogue (averaged over users) and of
an item's scores over the users (averaged over items). A collapsed encoder ranks every user's items alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from transrec.trainer.eval_data import eval_users


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine over all pairs of distinct rows of `x` [N, d] (N >= 2)."""
    if len(x) < 2:
        raise ValueError(f"mean pairwise cosine needs at least 2 rows, got {len(x)}")
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    total = unit.sum(0).pow(2).sum() - unit.pow(2).sum()  # sum over i != j of cos(x_i, x_j)
    return float(total / (len(x) * (len(x) - 1)))


def mean_share(x: torch.Tensor) -> float:
    """|mean row|^2 / mean |row|^2: 1 when all rows are equal, 0 when they cancel out."""
    x = x.double()
    return float(x.mean(0).pow(2).sum() / x.pow(2).sum(-1).mean())


def last_position_states(ranker, items: torch.Tensor, hist: torch.Tensor) -> dict[str, torch.Tensor]:
    """The last position's state after the user encoder's input normalisation and after each block (a transformer
    encoder), and the user vector (`ranker.user_vectors` of the left-padded histories `hist` over `items`); only the
    user vector for other encoders."""
    encoder = ranker.model.user_encoder
    states: dict[str, torch.Tensor] = {}
    hooks = []
    if hasattr(encoder, "ln") and hasattr(encoder, "blocks"):
        def keep(name):
            return lambda module, inputs, output: states.__setitem__(name, output[:, -1].float())

        hooks.append(encoder.ln.register_forward_hook(keep("input")))
        hooks += [block.register_forward_hook(keep(f"block {i}")) for i, block in enumerate(encoder.blocks)]
    try:
        states["user vector"] = ranker.user_vectors(items, hist)
    finally:
        for hook in hooks:
            hook.remove()
    return states


def spread_report(ranker, split: str = "valid", users: int = 500, seed: int = 0) -> dict:
    """The layer-by-layer cosines and shares and the score spreads of `ranker`'s model (trainer.model_eval) on a
    seeded sample of `users` of the split's evaluated users (all of them when fewer)."""
    model = ranker.model
    was_training = model.training
    model.eval()
    data = eval_users(ranker.sequences, split, model.cfg.max_len)
    if len(data) < 2:
        raise ValueError(f"the {split} split has {len(data)} evaluated users: at least 2 are needed")
    take = np.sort(np.random.default_rng(seed).choice(len(data), min(users, len(data)), replace=False))
    sample = data.take(take)
    items = ranker.item_vectors()
    states = last_position_states(ranker, items, torch.as_tensor(sample.histories, device=items.device))
    model.train(was_training)
    scores = states["user vector"] @ items.T
    return {
        "split": split,
        "users": len(take),
        "items": len(items),
        "layers": {name: {"mean_pairwise_cosine": mean_pairwise_cosine(s), "mean_share": mean_share(s),
                          "mean_norm": float(s.norm(dim=-1).mean())} for name, s in states.items()},
        "item_vectors": {"mean_pairwise_cosine": mean_pairwise_cosine(items), "mean_share": mean_share(items),
                         "mean_norm": float(items.norm(dim=-1).mean())},
        "score_std_over_items": float(scores.std(dim=1).mean()),
        "score_std_over_users": float(scores.std(dim=0).mean()),
    }


def format_report(report: dict) -> str:
    lines = [f"{report['users']} {report['split']} users, {report['items']} items",
             "| state of the last position | mean pairwise cosine | mean share | mean norm |", "|---|---|---|---|"]
    for name, r in [*report["layers"].items(), ("item vectors (catalogue)", report["item_vectors"])]:
        lines.append(f"| {name} | {r['mean_pairwise_cosine']:.3f} | {r['mean_share']:.3f} | {r['mean_norm']:.3f} |")
    lines.append(f"score spread: std over items per user {report['score_std_over_items']:.3f}; std over users per "
                 f"item {report['score_std_over_users']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from transrec.data_shards.integrity import IntegrityError
    from transrec.data_shards.remote import local_shards
    from transrec.trainer.model_eval import export_cli, ranker_from_export

    p = export_cli("python -m transrec.trainer.collapse", __doc__)
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
