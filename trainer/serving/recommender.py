"""Recommendations from an export, for any catalogue of shards, by content (the serving layer's core).

    rec = Recommender.from_export("runs/RUN/export", catalogue="shards/my-catalogue")
    rec.recommend(["raw item id", ...], k=10)          # {"items": [...], "scores": [...], "ignored": [], "note": ""}
    rec.add_item("new-id", text="A red leather shoe")  # recommendable at once (cold start)

Items are scored as the export's scoring.json says (trainer/evaluation/scoring.py: the model's user vector, or the mean
of the history's item vectors, plus a popularity prior); absent, by the model's user vector alone; `rec.scoring` sets
another. A model giving NaN or infinite vectors cannot rank: the Recommender checks the catalogue's item vectors when
it loads (and each item added later) and every request's user vectors and scores, and raises ranking.NonFiniteScores
naming how many items or users are affected. serving/batch.py writes one JSON line per user (the batch command,
`python -m transrec.trainer.commands.recommend`); MicroBatcher lets concurrent requests share one model pass (the
service).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch

from transrec.data_shards.modalities import content_kind, modality_choice
from transrec.data_shards.shard_io import read_id_maps
from transrec.data_shards.tokenizer import load_tokenizer
from transrec.trainer.core.modalities import content_settings
from transrec.trainer.core.text_vocab import tokenizer_dir
from transrec.trainer.evaluation.model_ranker import ModelRanker, ranker_from_export
from transrec.trainer.evaluation.ranking import NonFiniteScores, count_nonfinite, interaction_counts
from transrec.trainer.evaluation.scoring import Scoring, read_scoring, scored_items, user_side

REMEDY = "diverged or damaged weights: retrain the model or use an earlier export"
PLAIN = Scoring()  # the model's user vector, no prior: the only scoring an approximate index (self.ann) serves


def shown(raw_id: str, limit: int = 40) -> str:
    """An id as error messages quote it: repr of at most `limit` characters (a caller's id may be megabytes)."""
    return repr(raw_id) if len(raw_id) <= limit else repr(raw_id[:limit]) + f"...({len(raw_id)} characters)"


class UnknownItems(ValueError):
    """Every id of a history is unknown to the catalogue. The message quotes the first few, each cut short."""

    def __init__(self, ids: list[str]):
        self.ids = ids
        quoted = ", ".join(shown(i) for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        super().__init__(f"none of the history's {len(ids)} item ids is in the catalogue: {quoted} (send the "
                         "catalogue's raw item ids, or an empty history for the most popular items)")


class DuplicateItem(ValueError):
    """An item id already in the catalogue, or being added by another call at this moment."""

    def __init__(self, raw_id: str, pending: bool = False):
        self.raw_id = raw_id
        super().__init__(f"item {shown(raw_id)} is already " + (
            "being added by another request (it is in the catalogue once that one succeeds)" if pending
            else "in the catalogue") + ": choose another id")


class Recommender:
    """`ranker`'s model over its catalogue (raw ids, training popularity and manifest read from its shards), with
    the catalogue's item vectors [V, d] (encoded by the ranker, or read from an index), scored as `scoring` says
    (trainer/evaluation/scoring.py; its prior counts: the training interactions, 0 for items added later)."""

    def __init__(self, ranker: ModelRanker, item_vectors: torch.Tensor, scoring: Scoring | None = None):
        self.ranker, self.model = ranker, ranker.model
        self.item_ids = read_id_maps(ranker.store.shard_dir)["items"]
        self.index = {raw: i for i, raw in enumerate(self.item_ids)}
        self.item_vectors = item_vectors  # [V, d] fp32, grows with add_item
        self.popularity = interaction_counts(ranker.sequences, len(self.item_ids))  # training interactions per item
        self.scoring = scoring if scoring is not None else PLAIN  # how top_k scores (replaceable at any time)
        self._scored: tuple | None = None  # (item_vectors, popularity, scoring, their scored_items): reused
        self.manifest = ranker.store.manifest
        self.max_len = self.model.cfg.max_len
        self._lock = threading.Lock()  # add_item appends while other threads read
        self._adding: set[str] = set()  # ids add_item is encoding now (under _lock): one call per id wins
        self._insert_lock = threading.Lock()  # add_item's commit (e.g. a journal write) and insert, in one order
        self._tokenizer = None
        self.ann = None  # an approximate index over item_vectors (trainer/commands/index.py); exact search without it
        self.batcher: MicroBatcher | None = None  # set by the service: concurrent requests share one pass
        self.loaded_items = len(self.item_ids)  # the catalogue's own; the rest were added by add_item
        self.nonfinite_requests = 0  # recommend() calls stopped by NonFiniteScores (the service's /health shows it)
        self.unusable: str | None = self.check_model()  # why the model cannot rank (at load), or None

    @classmethod
    def from_export(cls, export_dir: str | Path, catalogue: str | Path, device: str = "cpu",
                    show_progress: bool = True, scoring: Scoring | None = None) -> Recommender:
        """Rebuild the model from `export_dir` and encode every item of the `catalogue` shards by content; scored
        as `scoring` says, by default as the export's scoring.json does (read once the export is verified)."""
        ranker = ranker_from_export(Path(export_dir), Path(catalogue), device, show_progress=show_progress)
        return cls(ranker, ranker.item_vectors(), read_scoring(Path(export_dir)) if scoring is None else scoring)

    def check_model(self) -> str | None:
        """The reason the model cannot rank now, or None: NaN or infinite item vectors (the catalogue's and those
        added since), or a NaN or infinite user vector of a probe history (one item; the first max_len items). Run at
        load and by the service's /health."""
        with self._lock:
            iv = self.item_vectors
        n = len(iv)
        bad = int(count_nonfinite(iv)) if n else 0
        if bad:
            return f"the model gives NaN or infinite vectors to {bad} of {n} catalogue items: it cannot rank ({REMEDY})"
        if n and int(count_nonfinite(self.user_vectors([[0], list(range(min(n, self.max_len)))], iv))):
            return f"the model gives a NaN or infinite user vector to a probe history: it cannot rank ({REMEDY})"
        return None

    # -- users ----------------------------------------------------------------------------------------------
    def padded(self, histories: list[list[int]]) -> torch.Tensor:
        """[B, max_len]: the histories (item indices, oldest first) left-padded with -1, the last max_len kept."""
        hist = torch.full((len(histories), self.max_len), -1, dtype=torch.long)
        for r, h in enumerate(histories):
            h = h[-self.max_len:]
            if h:
                hist[r, self.max_len - len(h):] = torch.as_tensor(h)
        return hist

    def user_vectors(self, histories: list[list[int]], item_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """[B, d]: the model's user vector of each history (item indices, oldest first, the last max_len used)."""
        iv = self.item_vectors if item_vectors is None else item_vectors
        return self.ranker.user_vectors(iv, self.padded(histories).to(iv.device))

    def items_side(self, iv: torch.Tensor, counts: np.ndarray, scoring: Scoring) -> torch.Tensor:
        """[V, d (+1)]: the item side of `scoring` (scoring.scored_items) over `iv` with the prior's `counts`, zeros
        for items beyond them; kept until the items or the scoring change."""
        cached = self._scored
        if cached is not None and cached[0] is iv and cached[1] is counts and cached[2] == scoring:
            return cached[3]
        full = np.zeros(len(iv))
        full[:min(len(counts), len(iv))] = np.asarray(counts, dtype=np.float64)[:len(iv)]
        items = scored_items(iv, scoring, full)
        self._scored = (iv, counts, scoring, items)
        return items

    def top_k(self, histories: list[list[int]], k: int, exclude_seen: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [B, k], item indices [B, k]) as self.scoring scores (by default user . item content vector);
        seen items removed when asked. Popularity alone (user "none") keeps count ties in item order. The
        approximate index serves only the plain scoring (its vectors have no prior coordinate); otherwise exact
        search. NonFiniteScores when the model is unusable, or gives these histories NaN or infinite vectors or
        scores."""
        if self.unusable:
            raise NonFiniteScores(self.unusable)
        with self._lock:
            iv, ann, counts = self.item_vectors, self.ann, self.popularity
        scoring = self.scoring
        plain = scoring == PLAIN
        if plain:
            users = self.user_vectors(histories, iv)
        else:
            users = user_side(scoring, lambda _: self.user_vectors(histories, iv), iv,
                              self.padded(histories).to(iv.device))  # user_vectors: the plain path's, as it is
        bad = int(count_nonfinite(users))
        if bad:
            raise NonFiniteScores(f"the model gives NaN or infinite user vectors to {bad} of {len(users)} histories: "
                                  f"it cannot rank them ({REMEDY})")
        if plain and ann is not None and ann.ntotal == len(iv):  # items added since the index was built: exact
            return self._ann_top_k(ann, users, histories, k, exclude_seen)
        scores = users @ (iv if plain else self.items_side(iv, counts, scoring)).T
        bad = int(count_nonfinite(scores))  # finite vectors can still overflow
        if bad:
            raise NonFiniteScores(f"the model gives NaN or infinite scores to {bad} of {len(users)} histories: it "
                                  f"cannot rank them ({REMEDY})")
        if exclude_seen:
            rows = [r for r, h in enumerate(histories) for _ in h]
            cols = [i for h in histories for i in h]
            scores[rows, cols] = float("-inf")
        if scoring.user == "none":  # count ties (many) in item order, not topk's arbitrary one
            scores, items = torch.sort(scores, dim=1, descending=True, stable=True)
            return scores[:, :k], items[:, :k]
        return torch.topk(scores, min(k, scores.shape[1]), dim=1)

    def _ann_top_k(self, ann, users: torch.Tensor, histories: list[list[int]], k: int,
                   exclude_seen: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate top-k: k + (seen items) neighbours searched, seen ones dropped, -inf padded."""
        extra = max((len(set(h)) for h in histories), default=0) if exclude_seen else 0
        dist, idx = ann.search(users.cpu().numpy().astype(np.float32), min(k + extra, ann.ntotal))
        bad = int((~np.isfinite(dist[idx >= 0])).sum())
        if bad:
            raise NonFiniteScores(f"the approximate index gives {bad} NaN or infinite scores: it cannot rank "
                                  "(rebuild it with `python -m transrec.trainer.commands.index`)")
        scores = torch.full((len(histories), k), float("-inf"))
        items = torch.zeros((len(histories), k), dtype=torch.long)
        for r, h in enumerate(histories):
            seen = set(h) if exclude_seen else set()
            keep = [(float(d), int(i)) for d, i in zip(dist[r], idx[r]) if i >= 0 and int(i) not in seen][:k]
            for c, (d, i) in enumerate(keep):
                scores[r, c], items[r, c] = d, i
        return scores, items

    def recommend(self, history: list[str], k: int = 10, exclude_seen: bool = True) -> dict:
        """Top-k raw item ids for a history of raw ids (oldest first). Unknown ids are ignored and listed; a history
        of only unknown ids is an error naming them; an empty history gets the most popular items (said in
        "note")."""
        n = len(self.item_ids)
        if not 1 <= k <= n:
            raise ValueError(f"k must be between 1 and the catalogue size {n}, got {k}")
        known = [self.index[h] for h in history if h in self.index]
        unknown = [h for h in history if h not in self.index]
        if history and not known:
            raise UnknownItems(unknown)
        if not known:
            order = np.argsort(-self.popularity[:n], kind="stable")[:k]
            return {"items": [self.item_ids[i] for i in order], "scores": [float(self.popularity[i]) for i in order],
                    "ignored": [], "note": "empty history: the most popular items of the catalogue's training data "
                                          "(scores are interaction counts)"}
        available = n - (len(set(known)) if exclude_seen else 0)
        kk = min(k, max(available, 1))
        batcher = self.batcher
        try:
            scores, items = (batcher.top_k(known, kk, exclude_seen) if batcher
                             else self.top_k([known], kk, exclude_seen))
        except NonFiniteScores:
            with self._lock:
                self.nonfinite_requests += 1
            raise
        keep = torch.isfinite(scores[0])
        return {"items": [self.item_ids[i] for i in items[0][keep].tolist()],
                "scores": [float(s) for s in scores[0][keep]], "ignored": unknown, "note": ""}

    # -- new items (cold start) -----------------------------------------------------------------------------
    def add_item(self, raw_id: str, text: str | None = None, image_jpeg: bytes | None = None,
                 content: dict[str, object] | None = None, before_insert: Callable[[], None] | None = None) -> str:
        """Encode a new item by its content and make it recommendable at once; returns the tower used. `content`:
        {modality: value} for a registered modality other than text and image (the value its builder hook gives,
        packed by its content kind), instead of a text or an image.

        Safe from several threads: of concurrent calls with one id exactly one adds it, the others raise
        DuplicateItem. `before_insert` (e.g. a journal write) runs once the item is encoded and just before it is
        inserted, in insertion order; if it raises, the item is not added. A NaN or infinite vector:
        NonFiniteScores, the item not added."""
        with self._lock:
            if raw_id in self.index or raw_id in self._adding:
                raise DuplicateItem(raw_id, pending=raw_id not in self.index)
            self._adding.add(raw_id)
        try:
            vec, tower = self._encode_item(raw_id, text, image_jpeg, content)
            if int(count_nonfinite(vec)):
                raise NonFiniteScores(f"item {shown(raw_id)}: the model gives its content a NaN or infinite vector: "
                                      f"not added ({REMEDY})")
            with self._insert_lock:
                if before_insert is not None:
                    before_insert()
                with self._lock:
                    self.item_vectors = torch.cat([self.item_vectors, vec.float()])
                    self.index[raw_id] = len(self.item_ids)
                    self.item_ids.append(raw_id)
                    self.popularity = np.append(self.popularity, 0.0)
        finally:
            with self._lock:
                self._adding.discard(raw_id)
        return tower

    @torch.no_grad()
    def _encode_item(self, raw_id: str, text: str | None, image_jpeg: bytes | None,
                     content: dict[str, object] | None) -> tuple[torch.Tensor, str]:
        """(the new item's vector [1, d], its tower); ValueError naming the item when its content does not fit."""
        text = (text or "").strip()
        if content:
            if text or image_jpeg is not None or len(content) != 1:
                raise ValueError(f"item {shown(raw_id)}: give one modality's content, or a text and / or an image")
            ((tower, value),) = content.items()
        elif not text and image_jpeg is None:
            raise ValueError(f"item {shown(raw_id)} has no content: give a text, an image, or both")
        elif image_jpeg is None:
            tower = "text"
        elif not text:
            tower = "image"
        else:
            rule = self.manifest.get("modality", "mixed")
            tower = {"text": "text", "image": "image"}.get(rule) or ("image" if modality_choice(raw_id, 0) else "text")
        if tower not in self.model.towers:
            raise ValueError(f"item {shown(raw_id)}: this model has no {shown(str(tower))} tower (it has "
                             f"{', '.join(self.model.towers)})")
        device = self.item_vectors.device
        if content:
            if tower == "text":  # raw token ids: checked here, as the tokenizer's own are by construction
                value = self._token_ids(raw_id, value)
            try:
                data, start = content_kind(tower).pack(value)
            except (ValueError, TypeError) as e:
                raise ValueError(f"item {shown(raw_id)}: its {tower} content cannot be packed: {e}") from None
            payload = data[start:]
        elif tower == "text":
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(tokenizer_dir(self.model.cfg.text.encoder))[0]
            # as the catalogue's items: tokenized at the shards' length, then cut to the model's (trainer loader)
            ids = self._tokenizer(text, truncation=True, max_length=self.manifest["text"]["max_tokens"])["input_ids"]
            payload = np.asarray(ids, dtype="<i4").tobytes()
        else:
            payload = image_jpeg
        kind = content_kind(tower)  # its options under the model's settings (an image: a Pillow decoder, on the CPU)
        options = content_settings(self.model.cfg, "pil").options_of(tower, "cpu")
        model_tower = self.model.towers[tower]
        try:
            inputs = kind.collate([payload], np.array([len(self.item_ids)]), options)
            lower = model_tower.lower({k: v.to(device) for k, v in inputs.items()})
            vec = model_tower.upper(self._as_cached(tower, lower))
        except (ValueError, TypeError, RuntimeError) as e:  # content of the wrong shape or kind for its tower
            if isinstance(e, ValueError) and tower == "image":
                raise  # an undecodable image names itself (CorruptImageError)
            raise ValueError(f"item {shown(raw_id)}: its {tower} content does not fit the {tower} tower: "
                             f"{e}") from None
        return vec, tower

    def _token_ids(self, raw_id: str, value: object) -> list[int]:
        """`content.text` as token ids: a non-empty list of whole numbers within the text encoder's vocabulary, or
        ValueError (422) saying what to send."""
        bert = getattr(self.model.towers["text"], "bert", None)
        vocab = int(bert.config.vocab_size) if bert is not None else 2**31
        ok = (isinstance(value, list) and value
              and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in value))
        if not ok:
            raise ValueError(f"item {shown(raw_id)}: content.text must be a non-empty list of token ids, whole numbers "
                             f"from 0 to {vocab - 1} (the text encoder's vocabulary); or send the text itself as "
                             "\"text\"")
        return value

    def _as_cached(self, tower: str, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The frozen blocks' output rounded as the catalogue's feature cache stores it (half precision), so that a
        new item scores exactly as a catalogue item with the same content."""
        cache = self.model.cache
        if cache is None or not cache.covers(tower):
            return features
        return {k: v.to(cache.dtype).to(v.dtype) if v.is_floating_point() else v for k, v in features.items()}


class MicroBatcher:
    """Concurrent requests arriving within `max_wait_ms` of the first share one user-encoder and scoring pass (up
    to `max_batch`); each gets its own rows back. One worker thread runs the model. When a shared pass meets NaN or
    infinite scores, each request of it is run alone: only the requests whose own scores are not finite fail."""

    def __init__(self, rec: Recommender, max_batch: int = 64, max_wait_ms: float = 2.0):
        self.rec, self.max_batch, self.max_wait = rec, max_batch, max_wait_ms / 1000
        self.requests: queue.Queue = queue.Queue()
        self.batches, self.largest = 0, 0
        threading.Thread(target=self._run, name="recommend-batcher", daemon=True).start()

    def top_k(self, history: list[int], k: int, exclude_seen: bool) -> tuple[torch.Tensor, torch.Tensor]:
        done: Future = Future()
        self.requests.put((history, k, exclude_seen, done))
        return done.result()

    def _run(self) -> None:
        while True:
            batch = [self.requests.get()]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    batch.append(self.requests.get(timeout=left))
                except queue.Empty:
                    break
            self.batches, self.largest = self.batches + 1, max(self.largest, len(batch))
            for exclude in (True, False):
                group = [b for b in batch if b[2] == exclude]
                if not group:
                    continue
                try:
                    scores, items = self.rec.top_k([b[0] for b in group], max(b[1] for b in group), exclude)
                    for r, (_, k, _, done) in enumerate(group):
                        done.set_result((scores[r : r + 1, :k], items[r : r + 1, :k]))
                except NonFiniteScores as e:
                    if len(group) == 1:
                        group[0][3].set_exception(e)
                        continue
                    for history, k, _, done in group:
                        try:
                            done.set_result(self.rec.top_k([history], k, exclude))
                        except Exception as alone:  # noqa: BLE001 - handed to its own request
                            done.set_exception(alone)
                except Exception as e:  # noqa: BLE001 - handed to every waiting request
                    for b in group:
                        b[3].set_exception(e)
