"""How alike a model's user vectors are on a catalogue, layer by layer: the diagnosis of a collapsed user encoder
(the work of `python -m transrec.trainer.collapse`, whose docstring defines the figures).
"""

from __future__ import annotations

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
