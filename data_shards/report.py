"""Printed reports of a shard build: the paper's Table-1-style statistics and the bad-input summary."""

from __future__ import annotations

import numpy as np

from transrec.data_shards.bad_input import Problems


class HistoryForms:
    """Users and interactions by history form (text-only, image-only, ..., mixed) and interactions by item modality,
    counted one history at a time (the builder streams its users)."""

    def __init__(self, item_modality: np.ndarray, names=("text", "image")):
        self.item_modality, self.names = item_modality, list(names)
        self.forms = {**{f"{n}-only": [0, 0] for n in names}, "mixed": [0, 0]}  # users, interactions
        self.inter_by_mod = np.zeros(len(self.names), dtype=np.int64)

    def add(self, items) -> None:
        mods = self.item_modality[np.asarray(items, dtype=np.int64)]
        self.inter_by_mod += np.bincount(mods, minlength=len(self.names))
        present = np.unique(mods)
        form = f"{self.names[present[0]]}-only" if len(present) == 1 else "mixed"
        self.forms[form][0] += 1
        self.forms[form][1] += len(mods)

    def result(self) -> dict:
        return {
            "users_by_history_form": {k: v[0] for k, v in self.forms.items()},
            "interactions_by_history_form": {k: v[1] for k, v in self.forms.items()},
            "interactions_by_item_modality": {n: int(c) for n, c in zip(self.names, self.inter_by_mod)},
        }


def statistics(user_records: list[dict], item_modality: np.ndarray, names=("text", "image")) -> dict:
    """Users, items and interactions per modality form (users: by the modalities in their history)."""
    forms = HistoryForms(item_modality, names)
    for rec in user_records:
        forms.add(rec["items"])
    return forms.result()


def statistics_table(manifest: dict) -> str:
    s = manifest["statistics"]
    names = manifest.get("modalities", ["text", "image"])
    rows = [("all", manifest["num_users"], manifest["num_items"], manifest["num_interactions"])]
    for n in names:
        rows.append((f"{n} items", "", manifest["items_by_modality"][n], s["interactions_by_item_modality"][n]))
    for form in s["users_by_history_form"]:
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
