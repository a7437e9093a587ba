"""Training loader: WebDataset sequence streaming, exact rank/worker split, batch-unique item loading.

    loader = make_train_loader(shard_dir, LoaderConfig(window=25, batch_size=128), rank=0, world_size=1)
    loader.set_epoch(epoch); loader.skip_batches(k)   # resume mid-epoch at batch k
    for batch in loader: ...                             # SequenceBatch

Samples. Each user's training items (history[:num_train]) give windows: a window is the last <= `window`
items ending at a training position `end` (exclusive), for end = min_len, min_len + stride, ... and always
the user's last training position, so long histories give many training targets. `windows="last"` keeps
one window per user.

Order and split (`split`). "samples": every process streams every sequence shard with webdataset in the same
seeded shard order, expands windows, and passes them through the same seeded shuffle buffer, so all processes
see one global order; sample k of that order belongs to rank k % world_size. "shards": each rank streams only its
own shards, assigned once by window count (largest first, to the least-loaded rank), in a seeded order per epoch
through the same kind of buffer, so a rank reads 1/world of the data. "auto" takes "shards" when there are at
least 4 sequence shards per rank, "samples" otherwise (one rank: the two are the same order). A rank's samples are
cut into batches of `batch_size`, and batch b is built by worker (b - first) % num_workers, which is the order in
which the PyTorch DataLoader polls its workers. Every rank yields exactly `steps_per_epoch` batches (from the
largest rank's share): a rank whose share is short is padded with zero-weight copies (weight 0, excluded from the
loss and from coverage), since unequal step counts hang ZeRO's collectives. Every training window is thus seen
exactly once per epoch. Nothing per user is held in memory: window counts come from the manifest's per-shard
histogram of training lengths (a one-pass scan of the shards for older builds, or with `user_fraction` < 1), and
user features travel with each streamed sequence.

Batch-unique items. A batch holds, per (sequence, position), the index of its item in the batch's UNIQUE
items (plus `num_negatives` shared negatives sampled uniformly from the catalogue, seeded per batch). The
content of each unique item is loaded once from the ItemStore by offset and collated by its modality's content
kind (data_shards/modalities.py): token ids for text items, decoded pixels for image items (or their JPEG bytes,
left for the main process to decode, without `decode_in_loader`), and so on for any registered modality.

Integrity. The stream opens its folder through `load_manifest`, which checks every file against the manifest's
sha256 (data_shards/integrity.py), and checks them again at the start of every epoch, in the main process before
any worker starts and in each worker (a `stat` per file; a file changed since is hashed again): a damaged file is
one IntegrityError line naming it, also when a worker finds it.

Mixtures (data_shards/mixture.py). On a folder of several catalogues every batch holds the windows of ONE catalogue,
so a loss scores them against that catalogue's items only (`batch.span`) and shared negatives are drawn from it. The
windows still come in the one shuffled order above; each catalogue's windows fill that catalogue's batch, which is
yielded when full, so catalogues are mixed in proportion to their windows. In "samples" split the j-th window of a
catalogue belongs to rank j % world_size; `steps_per_epoch` sums the catalogues' batches of the largest share.

Host-side step plan. What the step would otherwise read back from the device is computed here, on the CPU, while
the previous step runs: the routing of the unique items to their modality's tower (`routing`), the flat indices of
the (position, next item) pairs that enter a dense loss (`keep`) and the number of real sequences (`num_real`).
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from queue import Full, Queue

import numpy as np
import torch
import webdataset as wds

from transrec.data_shards.batch import SequenceBatch, attach_step_plan, load_item_content, pin
from transrec.data_shards.integrity import IntegrityError, one_line, verify_shards
from transrec.data_shards.mixture import catalogue_bounds, user_bounds
from transrec.data_shards.modalities import ContentOptions, ContentSettings
from transrec.data_shards.shard_io import ItemStore, load_manifest, sequence_records


@dataclass
class LoaderConfig:
    window: int = 25  # model length: items per window (stage 2: history n + continuation l)
    batch_size: int = 128  # sequences per rank per step (micro batch)
    windows: str = "all"  # "all": every training position (with `stride`); "last": one window per user
    stride: int = 1
    min_len: int = 2  # shortest window (stage 1: 1 input + 1 target; stage 2: 1 + l)
    shuffle_buffer: int = 4096
    seed: int = 0
    num_workers: int = 0
    num_negatives: int = 0  # shared negatives per batch (stage 2)
    load_content: bool = True  # False when the towers read cached features by item id
    decode_in_loader: bool = True  # False: hand JPEG bytes to the main process (GPU decoding)
    # each modality's content settings (data_shards/modalities.py: text tokens, image size and decoder, ...)
    content: ContentSettings = field(default_factory=ContentSettings)
    prefetch: int = 2
    split: str = "auto"  # "samples" | "shards" | "auto" (module docstring)
    pin_memory: bool = False  # page-locked batches (CUDA: asynchronous host-to-device copies)
    user_fraction: float = 1.0  # seeded fraction of users whose windows are used (scaling experiments)

    def __post_init__(self) -> None:
        if self.window < 2 or self.batch_size < 1 or self.stride < 1:
            raise ValueError("window must be >= 2, batch_size >= 1, stride >= 1")
        if self.windows not in ("all", "last"):
            raise ValueError(f"windows must be 'all' or 'last', not {self.windows!r}")
        if not 2 <= self.min_len <= self.window:
            raise ValueError(f"min_len must be in [2, window={self.window}], got {self.min_len}")
        if not 0 < self.user_fraction <= 1:
            raise ValueError("user_fraction must be in (0, 1]")
        if self.split not in ("auto", "samples", "shards"):
            raise ValueError(f"split must be 'auto', 'samples' or 'shards', not {self.split!r}")


def window_ends(num_train: int, cfg: LoaderConfig) -> list[int]:
    """End positions (exclusive) of a user's training windows."""
    if num_train < cfg.min_len:
        return []
    if cfg.windows == "last":
        return [num_train]
    ends = list(range(cfg.min_len, num_train + 1, cfg.stride))
    if ends[-1] != num_train:
        ends.append(num_train)
    return ends


def chosen_users(num_users: int, fraction: float, seed: int) -> list[int]:
    """The seeded `fraction` of users 0..num_users-1 whose windows are used (all of them at 1)."""
    if fraction >= 1:
        return list(range(num_users))
    rng = random.Random(f"users:{seed}")
    return sorted(rng.sample(range(num_users), max(1, round(fraction * num_users))))


def assign_shards(windows: dict[str, int], world_size: int) -> list[list[str]]:
    """Sequence shards per rank: largest window count first, each to the least-loaded rank (ties: lower rank, then
    shard name), so ranks' shares differ by at most one shard's windows."""
    load, owned = [0] * world_size, [[] for _ in range(world_size)]
    for name in sorted(windows, key=lambda n: (-windows[n], n)):
        r = min(range(world_size), key=lambda i: (load[i], i))
        owned[r].append(name)
        load[r] += windows[name]
    return owned


class TrainStream(torch.utils.data.IterableDataset):
    """One rank's batches of one epoch (see the module docstring for the split rule)."""

    def __init__(self, shard_dir: Path | str, cfg: LoaderConfig, rank: int = 0, world_size: int = 1,
                 item_modality: np.ndarray | None = None):
        super().__init__()
        self.item_modality = item_modality  # the model's routing (default: the shards' modality per item)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.shard_dir = Path(shard_dir)
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.manifest = load_manifest(self.shard_dir)
        names = list(self.manifest["shards"]["sequences"])
        self.urls = [str(self.shard_dir / n) for n in names]
        fraction = cfg.user_fraction
        self.users = None if fraction >= 1 else set(chosen_users(self.manifest["num_users"], fraction, cfg.seed))
        self.bounds = catalogue_bounds(self.manifest)  # [C + 1] item offsets of a mixture's catalogues, or None
        self.user_bounds = user_bounds(self.manifest)
        windows = self._windows_per_shard(names)
        self.num_samples = sum(windows.values())
        if self.num_samples == 0:
            raise ValueError(f"no training windows in {shard_dir} (min_len={cfg.min_len}): histories too short")
        auto = "shards" if world_size > 1 and len(names) >= 4 * world_size else "samples"
        self.split = auto if cfg.split == "auto" else cfg.split
        self.catalogue_windows = [self.num_samples]  # training windows per catalogue (all ranks')
        if self.bounds is not None:
            self.catalogue_windows = [sum(w for n, w in windows.items() if self.shard_catalogue(n) == c)
                                      for c in range(len(self.bounds) - 1)]
        if self.split == "shards":
            owned = assign_shards(windows, world_size)
            self.own_urls = [str(self.shard_dir / n) for n in names if n in set(owned[rank])]
            shares = [[sum(windows[n] for n in mine)] for mine in owned]
            if self.bounds is not None:  # per rank, the windows of each catalogue (a mixture's tars hold one each)
                shares = [[sum(windows[n] for n in mine if self.shard_catalogue(n) == c)
                           for c in range(len(self.bounds) - 1)] for mine in owned]
        else:
            self.own_urls = self.urls
            shares = [[-(-t // world_size) for t in self.catalogue_windows]]
        self.steps_per_epoch = max(sum(-(-w // cfg.batch_size) for w in share) for share in shares)
        self.epoch = 0
        self.first_batch = 0
        self.store: ItemStore | None = None
        self._options: ContentOptions | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.first_batch = epoch, 0

    def shard_catalogue(self, name: str) -> int:
        """The catalogue whose users a mixture's sequence tar holds (one per tar)."""
        for c, entry in enumerate(self.manifest["catalogues"]):
            if name in entry["sequence_shards"]:
                return c
        raise ValueError(f"{self.shard_dir}: {name} is in no catalogue of manifest['catalogues']: rebuild the mixture")

    def user_catalogue(self, user: int) -> int:
        return 0 if self.user_bounds is None else int(np.searchsorted(self.user_bounds, user, side="right") - 1)

    def skip_batches(self, k: int) -> None:
        """Resume: the next iteration starts at batch k of the current epoch."""
        if not 0 <= k <= self.steps_per_epoch:
            raise ValueError(f"cannot skip {k} of {self.steps_per_epoch} batches")
        self.first_batch = k

    def _windows_per_shard(self, names: list[str]) -> dict[str, int]:
        """Training windows per sequence shard: from the manifest's histograms of training lengths, or (older
        builds, a user fraction) one pass over the shards' records keeping counts only."""
        lengths = self.manifest.get("sequence_shard_train_lengths")
        if lengths is not None and self.users is None and set(lengths) == set(names):
            return {n: sum(len(window_ends(int(k), self.cfg)) * c for k, c in lengths[n].items()) for n in names}
        return {n: sum(len(window_ends(r["num_train"], self.cfg)) for r in sequence_records(self.shard_dir / n)
                       if self.users is None or r["user"] in self.users) for n in names}

    # -- the sample order ---------------------------------------------------------------------------------
    def _samples(self):
        """(user, end, items, features) windows of this rank's shards ("shards") or of all ("samples", the global
        order), shuffled for this epoch."""
        cfg = self.cfg
        urls = list(self.own_urls)
        random.Random(f"shards:{cfg.seed}:{self.epoch}").shuffle(urls)
        pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.decode())
        rng = random.Random(f"buffer:{cfg.seed}:{self.epoch}")
        buffer: list[tuple[int, int, list[int], dict]] = []
        for sample in pipeline:
            seq = sample["json"]
            if self.users is not None and seq["user"] not in self.users:
                continue
            for end in window_ends(seq["num_train"], cfg):
                buffer.append((seq["user"], end, seq["items"][max(0, end - cfg.window) : end], seq["features"]))
                if len(buffer) >= cfg.shuffle_buffer:
                    j = rng.randrange(len(buffer))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def rank_batches(self):
        """This rank's batches as lists of (user, end, items, weight, features), padded to steps_per_epoch."""
        if self.bounds is not None:
            yield from self._catalogue_batches()
            return
        bs = self.cfg.batch_size
        current: list = []
        produced = 0
        first_real = None
        mine = (lambda k: True) if self.split == "shards" else (lambda k: k % self.world_size == self.rank)
        for k, (user, end, items, features) in enumerate(self._samples()):
            if not mine(k):
                continue
            current.append((user, end, items, 1.0, features))
            first_real = first_real or current[0]
            if len(current) == bs:
                yield current
                produced += 1
                current = []
        while produced < self.steps_per_epoch:
            filler = first_real or (0, 0, [0], 0.0, {})
            current += [(filler[0], filler[1], filler[2], 0.0, filler[4])] * (bs - len(current))
            yield current
            produced += 1
            current = []

    def _catalogue_batches(self):
        """rank_batches of a mixture: each batch one catalogue's windows; a catalogue's last batch and the batches
        that pad a short share are zero-weight copies of that catalogue's first window."""
        bs, world = self.cfg.batch_size, self.world_size
        count = [0] * (len(self.bounds) - 1)  # windows of each catalogue seen so far (all ranks')
        current: list[list] = [[] for _ in count]
        produced = 0
        for user, end, items, features in self._samples():
            c = self.user_catalogue(user)
            j, count[c] = count[c], count[c] + 1
            if self.split != "shards" and j % world != self.rank:
                continue
            current[c].append((user, end, items, 1.0, features))
            if len(current[c]) == bs:
                yield current[c]
                produced += 1
                current[c] = []
        for part in current:
            if part:
                yield part + [(*part[0][:3], 0.0, part[0][4])] * (bs - len(part))
                produced += 1
        filler = (self.manifest["catalogues"][0]["users"][0], 0, [int(self.bounds[0])], 0.0, {})  # catalogue 0's
        while produced < self.steps_per_epoch:
            yield [filler] * bs
            produced += 1

    # -- building a batch ---------------------------------------------------------------------------------
    def _options_for_worker(self) -> ContentOptions:
        """Each modality's collating options in this worker (made once: they hold decoders)."""
        if self._options is None:
            self._options = self.cfg.content.options("cpu", decode=self.cfg.decode_in_loader)
        return self._options

    def make_batch(self, index: int, samples: list) -> SequenceBatch:
        cfg = self.cfg
        if self.store is None:
            self.store = ItemStore(self.shard_dir)
        W = cfg.window
        items = np.full((len(samples), W), -1, dtype=np.int64)
        for r, (_, _, its, _, _) in enumerate(samples):
            items[r, W - len(its) :] = its
        catalogue, span = 0, None
        if self.bounds is not None:
            catalogue = self.user_catalogue(samples[0][0])
            span = (int(self.bounds[catalogue]), int(self.bounds[catalogue + 1]))
        lo, hi = span or (0, self.store.num_items)
        negatives = np.zeros(0, dtype=np.int64)
        if cfg.num_negatives:
            rng = np.random.default_rng([cfg.seed, self.epoch, index, self.rank, 7])
            negatives = rng.integers(lo, hi, size=cfg.num_negatives)
        present = items[items >= 0]
        unique, inverse = np.unique(np.concatenate([present, negatives]), return_inverse=True)
        slots = np.full_like(items, -1)
        slots[items >= 0] = inverse[: len(present)]
        names = self.manifest["feature_vocabularies"]["user"]
        feats = {}
        for name in names:
            rows = [features.get(name, [0]) for (_, _, _, _, features) in samples]
            width = max(len(r) for r in rows)
            feats[name] = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)
        batch = SequenceBatch(
            items=torch.from_numpy(items),
            slots=torch.from_numpy(slots),
            users=torch.tensor([s[0] for s in samples], dtype=torch.long),
            ends=torch.tensor([s[1] for s in samples], dtype=torch.long),
            weights=torch.tensor([s[3] for s in samples], dtype=torch.float32),
            unique_items=torch.from_numpy(unique),
            negatives=torch.from_numpy(negatives),
            negative_slots=torch.from_numpy(inverse[len(present) :].astype(np.int64)),
            batch_index=index,
            user_features=feats,
            catalogue=catalogue,
            span=span,
        )
        modality = self.store.modality if self.item_modality is None else self.item_modality
        attach_step_plan(batch, modality, len(self.store.modality_names))
        if cfg.load_content:
            batch.content = load_item_content(self.store, unique, self._options_for_worker(), modality=modality)
        return pin(batch) if cfg.pin_memory else batch

    def check_files(self) -> None:
        """Every shard file against the manifest this stream was planned from, before an epoch reads any (a `stat`
        per file once verified; a file changed since is hashed again): raises IntegrityError naming it."""
        verify_shards(self.shard_dir, self.manifest)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        self.check_files()  # in each worker process as well: what webdataset streams and the item store maps
        for b, samples in enumerate(self.rank_batches()):
            if b < self.first_batch or (b - self.first_batch) % workers != worker:
                continue
            yield self.make_batch(b, samples)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.first_batch


class _ThreadPrefetcher:
    """Builds the next batches in a background thread while the current step runs (num_workers=0). A consumer that
    stops early (break, an exception, garbage collection) stops and joins the thread: no thread is left inside torch
    when the interpreter shuts down."""

    def __init__(self, iterable, depth: int):
        self.iterable, self.depth = iterable, max(1, depth)

    def __iter__(self):
        queue: Queue = Queue(self.depth)
        stop = threading.Event()
        done = object()

        def put(x) -> bool:  # False once the consumer has gone
            while not stop.is_set():
                try:
                    queue.put(x, timeout=0.05)
                    return True
                except Full:
                    continue
            return False

        def run():
            source = iter(self.iterable)
            try:
                for x in source:
                    if not put(x):
                        return
                put(done)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer thread
                put(e)
            finally:
                close = getattr(source, "close", None)
                close() if close else None

        thread = threading.Thread(target=run, daemon=True, name="transrec-prefetch")
        thread.start()
        try:
            while True:
                x = queue.get()
                if x is done:
                    return
                if isinstance(x, BaseException):
                    raise x
                yield x
        finally:
            stop.set()
            thread.join()


class TrainLoader:
    """Iterable over one rank's batches of an epoch, with prefetch (worker processes or a thread)."""

    def __init__(self, stream: TrainStream):
        self.stream = stream
        self.cfg = stream.cfg

    @property
    def steps_per_epoch(self) -> int:
        return self.stream.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def skip_batches(self, k: int) -> None:
        self.stream.skip_batches(k)

    def state_dict(self, epoch: int, batches_done: int) -> dict:
        return {"epoch": epoch, "batches_done": batches_done, "seed": self.cfg.seed}

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self):
        self.stream.check_files()  # in this process, before any worker starts: a changed file is one line here
        if self.cfg.num_workers == 0:
            yield from _ThreadPrefetcher(self.stream, self.cfg.prefetch)
            return
        loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            prefetch_factor=self.cfg.prefetch,
            persistent_workers=False,
        )
        it = iter(loader)
        try:
            yield from it
        except IntegrityError as e:  # raised in a worker: re-raised there with the worker's traceback in its message
            raise IntegrityError(one_line(e)) from None
        finally:  # stopped early: the worker processes go now, not at interpreter shutdown
            shutdown = getattr(it, "_shutdown_workers", None)
            shutdown() if shutdown else None


def make_train_loader(shard_dir: Path | str, cfg: LoaderConfig, rank: int = 0, world_size: int = 1,
                      item_modality: np.ndarray | None = None) -> TrainLoader:
    return TrainLoader(TrainStream(shard_dir, cfg, rank, world_size, item_modality))
