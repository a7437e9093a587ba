"""A third modality added through the registry alone (trainer.core.modalities.register): a numeric signal per item with
a small tower of its own, written by a builder hook. Nothing outside this file knows it: shards are built with it,
mixed sequences of the three modalities route to their towers, the trainer caches its frozen block, trains it end to
end in stage 2 and evaluates, and serving adds a new item of the modality by its content."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import content_options
from safetensors.torch import load_file
from torch import nn

from transrec.data_shards.batch import load_item_content
from transrec.data_shards.build import BuildOptions, build
from transrec.data_shards.modalities import ContentKind
from transrec.data_shards.shard_io import ItemStore
from transrec.trainer.core import modalities
from transrec.trainer.core.towers import Tower

REPO = Path(__file__).resolve().parents[1]
LENGTH = 12  # samples per signal


def signal_of(raw_id: str) -> np.ndarray | None:
    """Every third item (by a hash of its id) carries a signal: a sine whose frequency and phase come from the id."""
    digest = hashlib.sha256(f"signal:{raw_id}".encode()).digest()
    if digest[0] % 3:
        return None
    t = np.arange(LENGTH, dtype=np.float32)
    return np.sin(t * (1 + digest[1] % 5) / 4 + digest[2] / 40).astype("<f4")


@dataclass(frozen=True)
class SignalSettings:
    """The modality's own content settings: what collating its payloads depends on (from model.signal.gain)."""

    gain: float = 1.0


def collate_signals(payloads, items, options: SignalSettings) -> dict[str, torch.Tensor]:
    signals = np.stack([np.frombuffer(p, dtype="<f4") for p in payloads]) * options.gain
    return {"signal": torch.from_numpy(signals.astype(np.float32))}


@dataclass
class SignalConfig:
    """The modality's own configuration section, model.signal.*: no core file names it."""

    hidden: int = 16  # width of the tower's blocks
    gain: float = 1.0  # the signal's scale as the tower reads it: a content setting, owned by this modality

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise ValueError(f"model.signal.hidden must be >= 1, not {self.hidden!r}")


class SignalTower(Tower):
    """Two MLP blocks (the lower one cacheable) and a projection to d."""

    def __init__(self, d: int, trainable: int, hidden: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(LENGTH, hidden), nn.GELU()),
                                     nn.Sequential(nn.Linear(hidden, hidden), nn.GELU())])
        self.num_blocks = 2
        self.proj = nn.Sequential(nn.Linear(hidden, d), nn.GELU(), nn.Linear(d, d))
        self.set_trainable(trainable)

    def set_trainable(self, k: int) -> None:
        self.trainable = self.num_blocks if k == -1 else k
        self.split = self.num_blocks - self.trainable
        for i, block in enumerate(self.blocks):
            block.requires_grad_(i >= self.split)

    def backbone(self) -> nn.Module:
        return self.blocks

    def lower_state(self) -> dict[str, torch.Tensor]:
        return {f"block{i}.{n}": t for i, b in enumerate(self.blocks[: self.split]) for n, t in b.state_dict().items()}

    def lower(self, inputs):
        x = inputs["signal"]
        for block in self.blocks[: self.split]:
            x = block(x)
        return {"features": x}

    def upper(self, features):
        x = features["features"]
        for block in self.blocks[self.split :]:
            x = block(x)
        return self.proj(x)


@pytest.fixture(scope="module")
def signal_shards(tmp_path_factory):
    """The modality registered (one call), MovieLens built with it; unregistered afterwards."""
    kind = ContentKind("signal", member="signal.f32", collate=collate_signals,
                       pack=lambda a: (np.asarray(a, dtype="<f4").tobytes(), 0), settings=SignalSettings(),
                       identity=lambda options: {"gain": options.gain},
                       from_item=lambda raw_id, fields: signal_of(raw_id))
    modalities.register(modalities.Modality(
        kind, lambda cfg, trainable: SignalTower(cfg.d, trainable, cfg.signal.hidden), SignalConfig,
        architecture=("hidden",), content_settings=lambda cfg, decoder: SignalSettings(gain=cfg.signal.gain)))
    try:
        out = tmp_path_factory.mktemp("signal") / "shards"
        build(BuildOptions(dataset="movielens-100k-mm", source=REPO / "data" / "movielens-100k-mm", out=out,
                           max_tokens=16))
        yield out
    finally:
        modalities.unregister("signal")


def test_shards_store_the_third_modality(signal_shards):
    manifest = json.loads((signal_shards / "manifest.json").read_text())
    raw_ids = json.loads((signal_shards / "id_maps.json").read_text())["items"]
    store = ItemStore(signal_shards)
    assert manifest["modalities"] == ["text", "image", "signal"] and store.modality_names == ("text", "image", "signal")
    hooked = [i for i, raw in enumerate(raw_ids) if signal_of(raw) is not None]
    assert len(hooked) > 400 and manifest["items_by_modality"]["signal"] == len(hooked)
    assert sum(manifest["items_by_modality"].values()) == manifest["num_items"]
    others = np.setdiff1d(np.arange(len(raw_ids)), hooked)
    assert (store.modality[hooked] == 2).all() and (store.modality[others] < 2).all()
    for i in hooked[:20]:
        assert np.array_equal(np.frombuffer(store.payload(i, "signal"), dtype="<f4"), signal_of(raw_ids[i]))
    assert not store.has(others, "signal").any()
    assert "items with signal content (builder hook) are signal items" in manifest["modality_rule"]
    stats = manifest["statistics"]
    assert stats["interactions_by_item_modality"]["signal"] > 0 and stats["users_by_history_form"]["mixed"] > 900


def test_mixed_sequences_of_three_modalities_route_to_their_towers(signal_shards, tiny_bert_dir):
    from transrec.data_shards.decode import ImageDecoder
    from transrec.trainer.core.model import TransRec
    from transrec.trainer.core.overrides import apply_overrides
    from transrec.trainer.core.presets import preset

    store = ItemStore(signal_shards)
    cfg = apply_overrides(preset("tiny"), [f"model.text_encoder={tiny_bert_dir}"]).model
    torch.manual_seed(0)
    model = TransRec(cfg, store.num_items, store.modality, {"text": -1, "image": -1, "signal": -1},
                     modality_names=store.modality_names).eval()
    assert list(model.towers) == ["text", "image", "signal"]
    items = np.unique(np.random.default_rng(0).integers(0, store.num_items, size=60))
    decoder = ImageDecoder("pil", cfg.image.size)
    content = load_item_content(store, items, content_options(16, decoder))
    assert set(content.rows) == {"text", "image", "signal"}
    with torch.no_grad():
        routed = model.encode_items(torch.as_tensor(items), content)
        for row, item in enumerate(items):  # one item at a time through the tower of its own modality
            name = store.modality_names[store.modality[item]]
            single = load_item_content(store, np.array([item]), content_options(16, decoder))
            torch.testing.assert_close(routed[row], model.towers[name](single.inputs[name])[0], rtol=1e-4, atol=1e-5)


def test_the_trainer_trains_and_evaluates_the_third_modality(signal_shards, tiny_bert_dir, tmp_path):
    from transrec.trainer.core.overrides import apply_overrides
    from transrec.trainer.core.presets import preset
    from transrec.trainer.training.loop import Trainer

    cfg = apply_overrides(preset("tiny"), [f"data.shards={signal_shards}", f"model.text_encoder={tiny_bert_dir}",
                                           f"run_dir={tmp_path / 'run'}", "stage1.max_steps=2", "stage2.max_steps=2",
                                           "stage2.trainable=text:1,image:1,signal:1", "model.signal.hidden=24",
                                           "model.signal.gain=2.5"])
    trainer = Trainer(cfg, str(REPO / "ds_configs" / "zero2.json"))
    assert trainer.model.towers["signal"].proj[0].in_features == 24  # its own section, set on the command line
    initial = {k: v.clone() for k, v in trainer.model.towers["signal"].state_dict().items()}
    metrics = trainer.run()
    assert trainer.model.cache is not None and trainer.model.cache.covers("signal")
    # its content setting reached the feature cache: the cached block read the signals at model.signal.gain
    items = np.flatnonzero(trainer.store.modality == 2)[:6]
    raw = torch.from_numpy(np.stack([np.frombuffer(trainer.store.payload(int(i), "signal"), dtype="<f4")
                                     for i in items]))
    with torch.no_grad():
        expected = trainer.model.towers["signal"].blocks[0](2.5 * raw)
    cached = trainer.model.cache.features("signal", torch.as_tensor(items))["features"].float()
    torch.testing.assert_close(cached, expected, rtol=2e-3, atol=2e-3)  # stored in fp16
    assert not torch.allclose(cached, trainer.model.towers["signal"].blocks[0](raw).detach(), rtol=2e-3, atol=2e-3)
    stage1, stage2 = (load_file(str(tmp_path / "run" / f"best_stage{s}.safetensors")) for s in (1, 2))
    block = "towers.signal.blocks.{}.0.weight"
    assert torch.equal(stage1[block.format(1)], initial["blocks.1.0.weight"])  # stage 1: the whole backbone frozen
    assert not torch.equal(stage1["towers.signal.proj.2.weight"], initial["proj.2.weight"])  # its projection trains
    assert not torch.equal(stage2[block.format(1)], stage1[block.format(1)])  # stage 2: the top block trains
    assert torch.equal(stage2[block.format(0)], initial["blocks.0.0.weight"])  # the cached block stays frozen
    assert metrics["test"]["users"] == 943 and np.isfinite(metrics["test"]["ndcg@10"])
    assert (tmp_path / "run" / "export" / "model.safetensors").exists()
    # served from the export: a new item given by its signal alone scores as the catalogue item with that signal
    from transrec.trainer.serving.recommender import Recommender

    exported = json.loads((tmp_path / "run" / "export" / "config.json").read_text())["model"]
    assert exported["signal"] == {"hidden": 24, "gain": 2.5}  # the model's "signal" section, read back by serving
    rec = Recommender.from_export(tmp_path / "run" / "export", signal_shards, show_progress=False)
    assert rec.model.towers["signal"].proj[0].in_features == 24
    item = int(np.flatnonzero(rec.ranker.store.modality == 2)[0])
    assert rec.add_item("copy-signal", content={"signal": signal_of(rec.item_ids[item])}) == "signal"
    torch.testing.assert_close(rec.item_vectors[-1], rec.item_vectors[item], rtol=1e-5, atol=1e-5)
    assert "copy-signal" in rec.recommend([rec.item_ids[0]], k=len(rec.item_ids) - 1)["items"]
    # over HTTP: the content as JSON; content that does not fit the tower, or no such tower, is a 422, and the
    # service goes on
    from fastapi.testclient import TestClient

    from transrec.trainer.serving.app import create_app

    client = TestClient(create_app(rec, batching=False))
    values = signal_of(rec.item_ids[item]).tolist()
    ok = client.post("/items", json={"id": "http-signal", "content": {"signal": values}})
    assert ok.status_code == 200 and ok.json()["tower"] == "signal"
    torch.testing.assert_close(rec.item_vectors[-1], rec.item_vectors[item], rtol=1e-5, atol=1e-5)
    short = client.post("/items", json={"id": "short", "content": {"signal": [0.5, 0.25]}})
    assert short.status_code == 422 and "does not fit the signal tower" in short.json()["detail"]
    unknown = client.post("/items", json={"id": "sound", "content": {"sound": [1.0]}})
    assert unknown.status_code == 422 and "no 'sound' tower" in unknown.json()["detail"]
    assert client.post("/recommend", json={"history": [rec.item_ids[0]], "k": 5}).status_code == 200


def test_the_third_modality_owns_its_content_settings(signal_shards, tiny_bert_dir):
    """model.signal.gain reaches the loader's collating and the feature-store key through the registry alone: the
    core passes each modality's settings through without naming them."""
    from transrec.data_shards.loader import LoaderConfig, make_train_loader
    from transrec.trainer.core.feature_cache import feature_key
    from transrec.trainer.core.overrides import apply_overrides
    from transrec.trainer.core.presets import preset

    store = ItemStore(signal_shards)
    cfg = apply_overrides(preset("tiny"), [f"model.text_encoder={tiny_bert_dir}", "model.signal.gain=3"]).model
    settings = modalities.content_settings(cfg, "pil")
    assert settings.of("signal") == SignalSettings(gain=3.0) and settings.of("text").max_tokens == cfg.text.max_tokens
    loader = make_train_loader(signal_shards, LoaderConfig(window=9, batch_size=32, stride=5, content=settings))
    batch = next(b for b in loader if b.content is not None and "signal" in b.content.inputs)
    rows = batch.unique_items[batch.content.rows["signal"]].numpy()
    raw = np.stack([np.frombuffer(store.payload(int(i), "signal"), dtype="<f4") for i in rows])
    assert np.array_equal(batch.content.inputs["signal"]["signal"].numpy(), (raw * 3.0).astype(np.float32))
    options = settings.options("cpu")
    assert options.identity("signal") == {"gain": 3.0} and options.identity("text") == {"size": cfg.text.max_tokens}
    tower, items = SignalTower(8, 1), np.flatnonzero(store.modality == 2)
    keys = {feature_key(tower, store, items, modalities.content_settings(c, "pil").options("cpu").identity("signal"),
                        torch.float16)
            for c in (cfg, apply_overrides(preset("tiny"), ["model.signal.gain=1"]).model)}
    assert len(keys) == 2  # a changed content setting is a new feature-store key


def test_an_unregistered_modality_is_named(signal_shards, tiny_bert_dir, tmp_path):
    """Shards that use a modality this process has not registered, or a config naming one, fail with what to do."""
    from transrec.trainer.core.model import TransRec
    from transrec.trainer.core.overrides import apply_overrides
    from transrec.trainer.core.presets import preset
    from transrec.trainer.training.loop import Trainer

    store = ItemStore(signal_shards)
    signal_items = np.flatnonzero(store.modality == 2)[:3]
    registered = modalities.modality("signal")
    modalities.unregister("signal")
    try:
        with pytest.raises(KeyError, match="no modality 'signal' is registered.*register"):
            load_item_content(store, signal_items, content_options(16))
        with pytest.raises(KeyError, match="no modality 'signal' is registered.*register"):
            TransRec(preset("tiny").model, store.num_items, store.modality, {}, modality_names=store.modality_names)
    finally:
        modalities.register(registered)
    cfg = apply_overrides(preset("tiny"), [f"data.shards={signal_shards}", f"model.text_encoder={tiny_bert_dir}",
                                           f"run_dir={tmp_path / 'run'}", "stage2.trainable.sound=1"])
    with pytest.raises(ValueError, match="sound.*no registered modality"):
        Trainer(cfg, str(REPO / "ds_configs" / "zero2.json")).run()
