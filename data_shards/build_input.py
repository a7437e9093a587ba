"""The builder's input stage: raw tables -> the items and user histories the shards will hold, every finding reported.

Nothing here writes a file. Items get their rendered text, a check of their image and a modality (a builder hook's,
else the one --modality or the mixed rule wants, else the other built-in one, counted as a fallback); an item with no
content at all is reported and left out. Interactions naming an unknown item are reported, those naming a content-less
item counted; each user's history is ordered and deduplicated. All findings go to the domain's `Problems`, so that
data_shards/build.py can refuse under --strict before a shard is written, and record them in the manifest otherwise.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from transrec.data_shards import report
from transrec.data_shards.modalities import extra_kinds, modality_choice
from transrec.data_shards.shard_io import BUILT_IN_MODALITIES
from transrec.data_shards.tables import Interaction, RawDomain, render_text


@dataclass
class ItemPlan:
    """What the item shards will hold: the usable items in shard order (an item's index is its position in `usable`)
    and, for each, its rendered text, whether its image is readable and its modality code (an index into `names`)."""

    names: list[str]  # the shards' modalities: the built-in ones, then those of builder hooks
    hooked: dict[str, tuple[str, object]]  # raw item -> (modality, value to pack), from builder hooks
    usable: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    has_image: dict[str, bool] = field(default_factory=dict)
    modality: dict[str, int] = field(default_factory=dict)
    fallbacks: list[dict] = field(default_factory=list)  # items whose wanted built-in modality had no content
    index: dict[str, int] = field(default_factory=dict)  # raw item -> item index, once `usable` is complete


@dataclass
class Histories:
    """Each user's interactions with usable items, ordered and deduplicated, and what was dropped on the way: the
    manifest reports every count, so that a thin build can be traced to its input."""

    per_user: dict[str, list[Interaction]]
    users: list[str]  # raw user ids in shard order (a user's index is its position)
    duplicates: int  # repeats found (order_and_dedup), removed or not
    dropped_no_content: int  # interactions naming an item without usable content
    unparseable: int  # unparseable rows of the interactions table (other tables' rows are not interactions)
    removed: int = 0  # repeats removed by --dedup


def sort_key(raw: str):
    """Numeric ids in numeric order, then the others by text: shard order is stable and reads naturally."""
    return (0, int(raw), "") if raw.isdigit() else (1, 0, raw)


def check_image(path: Path | None) -> tuple[str | None, str]:
    """(None, "") if `path` is a decodable JPEG, else (problem category, reason)."""
    if path is None or not path.exists():
        return "missing_image", "no file"
    try:
        with Image.open(path) as im:
            if im.format != "JPEG":
                return "corrupt_image", f"not a JPEG ({im.format})"
            im.draft("RGB", (32, 32))  # DCT-scaled decode: fast, still reads every entropy-coded segment
            im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt file, reported with its reason
        return "corrupt_image", f"{type(e).__name__}: {e}"
    return None, ""


def check_images(domain: RawDomain, raw_items: list[str], modality: str, workers: int) -> list[tuple[str | None, str]]:
    """check_image of every item, in threads (decoding is most of a small build's time). A dataset declared
    text-only (no image column) is not checked: there an absent image is a choice, not a finding."""
    if not domain.has_image_column:
        if modality == "image":
            raise ValueError("--modality image: this dataset has no image column (--image-col ''); "
                             "name the image column or build --modality text")
        return [(None, "")] * len(raw_items)
    with ThreadPoolExecutor(workers) as pool:
        checks = pool.map(lambda r: check_image(domain.items[r].image_path), raw_items)
        return list(tqdm(checks, total=len(raw_items), desc="checking images", unit="img", disable=None))


def hooked_items(domain: RawDomain, raw_items: list[str], modality: str) -> dict[str, tuple[str, object]]:
    """Registered modalities with a builder hook claim the items they have content for (mixed builds only); an item
    two hooks return content for goes to the kind registered first."""
    hooked: dict[str, tuple[str, object]] = {}
    for kind in extra_kinds() if modality == "mixed" else []:
        for raw in raw_items:
            value = None if raw in hooked else kind.from_item(raw, dict(domain.items[raw].fields))
            if value is not None:
                hooked[raw] = (kind.name, value)
    return hooked


def plan_items(domain: RawDomain, modality: str, seed: int, workers: int) -> ItemPlan:
    """Every item's content and modality; a missing or corrupt image and an empty description are reported, and an
    item left with no content at all is reported and kept out of the shards."""
    raw_items = sorted(domain.items, key=sort_key)
    checks = check_images(domain, raw_items, modality, workers)
    hooked = hooked_items(domain, raw_items, modality)
    plan = ItemPlan(names=[*BUILT_IN_MODALITIES, *sorted({name for name, _ in hooked.values()})], hooked=hooked)
    for raw, (category, reason) in zip(raw_items, checks):
        rec = domain.items[raw]
        if category:
            image_name = rec.image_path.name if rec.image_path else ""
            domain.problems.add(category, item=raw, file=str(image_name), reason=reason)
        if not rec.description.strip():
            domain.problems.add("empty_text", item=raw, field="description")
        text = render_text(domain.text_template, rec.fields)
        plan.texts[raw], plan.has_image[raw] = text, category is None and domain.has_image_column
        if raw in hooked:
            plan.modality[raw] = plan.names.index(hooked[raw][0])
        elif text or plan.has_image[raw]:
            plan.modality[raw] = text_or_image(raw, plan, modality, seed, domain.has_image_column)
        else:
            domain.problems.add("item_without_content", item=raw)
            continue
        plan.usable.append(raw)
    plan.index = {raw: i for i, raw in enumerate(plan.usable)}
    return plan


def text_or_image(raw: str, plan: ItemPlan, modality: str, seed: int, has_image_column: bool) -> int:
    """The built-in modality code of an item with some content: the one --modality (under mixed, the rule of
    `modality_choice`) wants, or the other one, recorded as a fallback, when the wanted one has no content."""
    want = {"text": 0, "image": 1}.get(modality) if has_image_column else 0
    want = modality_choice(raw, seed) if want is None else want
    if bool(plan.texts[raw]) if want == 0 else plan.has_image[raw]:
        return want
    plan.fallbacks.append({"item": raw, "wanted": BUILT_IN_MODALITIES[want], "used": BUILT_IN_MODALITIES[1 - want]})
    return 1 - want


def user_histories(domain: RawDomain, item_index: dict[str, int], dedup: str) -> Histories:
    """Histories of the users with at least one interaction left; SystemExit when no user has one, as shards with
    no users would look like a build that worked."""
    per_user, dropped_no_content = interactions_by_user(domain, item_index)
    duplicates, removed = order_and_dedup(per_user, dedup, domain.has_time_column)
    inter_file = next(iter(domain.input_files))  # the interactions table (the first input file)
    problems = domain.problems
    unparseable = sum(1 for x in problems.found["unparseable_row"] if x.get("file") == inter_file)
    if not per_user:
        raise SystemExit(
            f"error: no interaction is left to build from: {len(domain.interactions) + unparseable} rows "
            f"in {inter_file}, of which unparseable {unparseable}, naming unknown items "
            f"{len(problems.found['unknown_item'])}, naming items without usable content (no text and no readable "
            f"image) {dropped_no_content}. Check the column flags and the item table; details: "
            f"{report.problem_summary(problems)}")
    users = sorted(per_user, key=sort_key)
    for u in users:
        if u not in domain.user_features and domain.user_features:
            problems.add("unknown_user_features", user=u)
    return Histories(per_user, users, duplicates, dropped_no_content, unparseable, removed)


def interactions_by_user(domain: RawDomain, item_index: dict[str, int]) -> tuple[dict[str, list[Interaction]], int]:
    """(each user's interactions in source order, how many named an item without usable content). An interaction
    naming an unknown item is reported; one naming a content-less item is only counted (the item was reported)."""
    per_user: dict[str, list[Interaction]] = {}
    dropped_no_content = 0
    for it in domain.interactions:
        if it.item not in domain.items:
            domain.problems.add("unknown_item", file=next(iter(domain.input_files)), line=it.row, item=it.item,
                                user=it.user)
        elif it.item not in item_index:
            dropped_no_content += 1
        else:
            per_user.setdefault(it.user, []).append(it)
    return per_user, dropped_no_content


def order_and_dedup(per_user: dict[str, list[Interaction]], dedup: str, has_time: bool = True) -> tuple[int, int]:
    """Stably sort each history by (time, source row) and, unless --dedup keep, drop repeats (same item and time;
    under `first`, same item). Returns (repeats found, removed): a repeat is an interaction whose (user, item, time)
    came before, or whose (user, item) did under `first` or without a time column (time = line number: never equal).
    """
    found = removed = 0
    for user, its in per_user.items():
        its.sort(key=lambda x: (x.time, x.row))
        seen, kept, pairs = set(), [], set()
        for x in its:
            key = x.item if dedup == "first" else (x.item, x.time)
            repeat = (x.item, x.time) if has_time and dedup != "first" else x.item
            found += repeat in pairs
            pairs.add(repeat)
            if key in seen and dedup != "keep":
                removed += 1
                continue
            seen.add(key)
            kept.append(x)
        per_user[user] = kept
    return found, removed
