"""The shards' files: items-NNNNNN.tar with item_index.npy (where each payload lies), and sequences-NNNNNN.tar (one
JSON sample per user) with each tar's histogram of training lengths. data_shards/build.py plans what goes in them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from transrec.data_shards import report
from transrec.data_shards.build_histories import HistoryStage, Progress
from transrec.data_shards.build_input import ItemPlan
from transrec.data_shards.modalities import content_kind
from transrec.data_shards.shard_io import DeterministicTarWriter, item_index_dtype
from transrec.data_shards.tables import ItemRecord, RawDomain


@dataclass
class SequenceShards:
    """The sequence tars written, and what the manifest says of their users."""

    names: list[str] = field(default_factory=list)
    statistics: dict = field(default_factory=dict)  # users and interactions by history form (report.HistoryForms)
    train_lengths: dict[str, dict[str, int]] = field(default_factory=dict)  # per shard: histogram of num_train
    evaluated: int = 0
    interactions: int = 0


def encode_features(features: dict[str, list[str]], vocab: dict[str, list[str]]) -> dict[str, list[int]]:
    lookup = {n: {v: i for i, v in enumerate(vs)} for n, vs in vocab.items()}
    return {n: [lookup[n].get(v, 0) for v in features.get(n, []) if v] or [0] for n in vocab}


def write_item_shards(tmp: Path, domain: RawDomain, plan: ItemPlan, token_ids: list[np.ndarray],
                      item_vocab: dict[str, list[str]], items_per_shard: int) -> list[str]:
    """items-NNNNNN.tar with each item's metadata and payloads, and item_index.npy, which says where each payload
    lies in its tar (readers seek to it instead of reading the tar); returns the tars' names."""
    index = np.zeros(len(plan.usable), dtype=item_index_dtype(plan.names))
    item_shards: list[str] = []
    for first in tqdm(range(0, len(plan.usable), items_per_shard), desc="writing item shards", unit="shard",
                      disable=None):
        name = f"items-{len(item_shards):06d}.tar"
        writer = DeterministicTarWriter(tmp / name)
        for i in range(first, min(first + items_per_shard, len(plan.usable))):
            index[i]["shard"], index[i]["modality"] = len(item_shards), plan.modality[plan.usable[i]]
            write_item(writer, i, domain.items[plan.usable[i]], plan, token_ids[i], item_vocab, index)
        writer.close()
        item_shards.append(name)
    np.save(tmp / "item_index.npy", index, allow_pickle=False)
    return item_shards


def write_item(writer: DeterministicTarWriter, i: int, rec: ItemRecord, plan: ItemPlan, tokens: np.ndarray,
               item_vocab: dict[str, list[str]], index: np.ndarray) -> None:
    """Item i's metadata and payloads (its tokens, its JPEG when readable, a hook's content) into `writer`, and each
    payload's offset and size into index[i]."""
    raw, key = plan.usable[i], f"{i:08d}"
    meta = {
        "item": i,
        "raw_id": raw,
        "modality": plan.names[plan.modality[raw]],
        "text": plan.texts[raw],
        "has_image": plan.has_image[raw],
        "features": encode_features(rec.features, item_vocab),
    }
    writer.add(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
    payloads = {"text": tokens}
    if plan.has_image[raw]:
        payloads["image"] = rec.image_path.read_bytes()
    if raw in plan.hooked:
        payloads[plan.hooked[raw][0]] = plan.hooked[raw][1]
    for kind in map(content_kind, payloads):
        data, payload_start = kind.pack(payloads[kind.name])  # the payload may follow a header inside the member
        index[i][f"{kind.name}_offset"] = writer.add(f"{key}.{kind.member}", data) + payload_start
        index[i][f"{kind.name}_size"] = len(data) - payload_start


def write_sequence_shards(tmp: Path, domain: RawDomain, plan: ItemPlan, histories: HistoryStage,
                          user_vocab: dict[str, list[str]], users_per_shard: int,
                          min_interactions: int) -> SequenceShards:
    """sequences-NNNNNN.tar, one JSON sample per user, and each tar's histogram of training lengths (the loader plans
    its batches from it without reading the tars). Users arrive one at a time, in shard order."""
    out = SequenceShards()
    item_mod = np.array([plan.modality[r] for r in plan.usable], dtype=np.int64)
    forms = report.HistoryForms(item_mod, plan.names)
    writer, histogram = None, {}
    progress = Progress("users written", histories.num_users)
    for u, (raw, items, times) in enumerate(histories.histories()):
        progress(u)
        if u % users_per_shard == 0:
            if writer is not None:
                writer.close()
            name = f"sequences-{len(out.names):06d}.tar"
            writer = DeterministicTarWriter(tmp / name)
            histogram = out.train_lengths.setdefault(name, {})
            out.names.append(name)
        sample = user_sample(u, raw, items, times, encode_features(domain.user_features.get(raw, {}), user_vocab),
                             min_interactions)
        writer.add(f"{u:08d}.json", json.dumps(sample, sort_keys=True).encode())
        histogram[str(sample["num_train"])] = histogram.get(str(sample["num_train"]), 0) + 1
        out.evaluated += sample["evaluated"]
        out.interactions += len(items)
        forms.add(items)
    if writer is not None:
        writer.close()
    out.statistics = forms.result()
    return out


def user_sample(u: int, raw: str, items: list[int], times: list[float], features: dict[str, list[int]],
                min_interactions: int) -> dict:
    """User u's sample: the history by item index, and how much of it is training (build.py's SPLIT_RULE)."""
    is_eval = len(items) >= min_interactions
    return {
        "user": u,
        "raw_id": raw,
        "items": items,
        "timestamps": times,
        "num_train": len(items) - 2 if is_eval else len(items),
        "evaluated": is_eval,
        "features": features,
    }
