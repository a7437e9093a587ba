"""Printed reports of a shard build: the paper's Table-1-style statistics and the bad-input summary."""

from __future__ import annotations

import numpy as np

from data_shards.tables import Problems


def statistics(user_records: list[dict], item_modality: np.ndarray) -> dict:
    """Users, items and interactions per modality form (users: by the modalities in their history)."""
    forms = {"text-only": [0, 0], "image-only": [0, 0], "mixed": [0, 0]}  # users, interactions
    inter_by_mod = [0, 0]
    for rec in user_records:
        mods = item_modality[np.asarray(rec["items"], dtype=np.int64)]
        n_img = int(mods.sum())
        inter_by_mod[1] += n_img
        inter_by_mod[0] += len(mods) - n_img
        form = "image-only" if n_img == len(mods) else "text-only" if n_img == 0 else "mixed"
        forms[form][0] += 1
        forms[form][1] += len(mods)
    return {
        "users_by_history_form": {k: v[0] for k, v in forms.items()},
        "interactions_by_history_form": {k: v[1] for k, v in forms.items()},
        "interactions_by_item_modality": {"text": inter_by_mod[0], "image": inter_by_mod[1]},
    }


def statistics_table(manifest: dict) -> str:
    s = manifest["statistics"]
    rows = [
        ("all", manifest["num_users"], manifest["num_items"], manifest["num_interactions"]),
        ("text items", "", manifest["items_by_modality"]["text"], s["interactions_by_item_modality"]["text"]),
        ("image items", "", manifest["items_by_modality"]["image"], s["interactions_by_item_modality"]["image"]),
    ]
    for form in ("text-only", "image-only", "mixed"):
        rows.append((f"{form} users", s["users_by_history_form"][form], "", s["interactions_by_history_form"][form]))
    lines = [
        f"{manifest['dataset']} ({manifest['modality']} modality)",
        f"| {'form':<18} | {'users':>7} | {'items':>7} | {'interactions':>12} |",
        f"|{'-' * 20}|{'-' * 9}|{'-' * 9}|{'-' * 14}|",
    ]
    lines += [f"| {r[0]:<18} | {r[1]!s:>7} | {r[2]!s:>7} | {r[3]!s:>12} |" for r in rows]
    pol = manifest["policies"]
    lines.append(
        f"evaluated users: {manifest['num_users_evaluated']} "
        f"(below {pol['min_interactions']} interactions, train-only: "
        f"{pol['users_below_min']}); duplicate interactions: {pol['duplicate_interactions']} "
        f"(--dedup {pol['dedup']}, removed {pol['duplicates_removed']}); modality fallbacks: "
        f"{manifest['modality_fallbacks']['count']}"
    )
    if pol.get("dedup_note"):
        lines.append(f"NOTE: {pol['dedup_note']}")
    if manifest.get("modality_rule", "").startswith("no image column"):
        lines.append("no image column: a text-only catalogue (no image tower is needed)")
    return "\n".join(lines)


def problem_summary(problems: Problems, show: int = 5) -> str:
    counts = problems.counts()
    if not problems.total():
        return "validation: no bad input found"
    lines = ["validation: bad input found (all listed in validation.json):"]
    for category, n in counts.items():
        if n:
            examples = "; ".join(
                ", ".join(f"{k}={v}" for k, v in d.items() if k != "row") for d in problems.found[category][:show]
            )
            lines.append(f"  {category}: {n}  e.g. {examples}")
    return "\n".join(lines)
