"""The embedding projector of a finished run (trainer/monitoring/projector.py): the files torch's SummaryWriter writes
for the items and users, read back and compared with the inputs, the shards' content and the modalities' hooks."""

from __future__ import annotations

import io
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import small_model_config
from google.protobuf import text_format
from PIL import Image
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
from torch.utils.tensorboard import SummaryWriter

from transrec.data_shards.decode import ImageDecoder, normalize
from transrec.data_shards.shard_io import ItemStore, read_id_maps
from transrec.data_shards.tokenizer import load_tokenizer
from transrec.trainer.core.modalities import DESCRIBE_CHARS, MODALITIES
from transrec.trainer.monitoring.projector import GREY, SPRITE_MAX_PX, add_table, item_label, write_projector

DIM = 8
USERS = 30
ODD_ID_ITEM = 2  # its raw id gets a tab and a line break


def projector_inputs(shards: Path, seed: int = 0) -> SimpleNamespace:
    """Seeded random vectors and counts for every item of `shards` and for USERS users."""
    store = ItemStore(shards)
    rng = np.random.default_rng(seed)
    raw_ids = list(read_id_maps(shards)["items"])
    raw_ids[ODD_ID_ITEM] = "odd\tid\nhere"
    return SimpleNamespace(
        store=store, codes=store.modality.copy(), raw_ids=raw_ids,
        items=torch.from_numpy(rng.standard_normal((store.num_items, DIM)).astype(np.float32)),
        counts=rng.integers(0, 500, store.num_items),
        users=torch.from_numpy(rng.standard_normal((USERS, DIM)).astype(np.float32)),
        user_ids=[f"user-{u}" for u in range(USERS)], lengths=rng.integers(1, 50, USERS))


def write(log_dir: Path, inputs: SimpleNamespace, cfg, **options) -> dict:
    with SummaryWriter(str(log_dir)) as writer:
        return write_projector(writer, inputs.store, inputs.codes, cfg, inputs.items, inputs.counts, inputs.raw_ids,
                               inputs.users, inputs.user_ids, inputs.lengths, **options)


def read_config(log_dir: Path) -> dict:
    config = text_format.Parse((log_dir / "projector_config.pbtxt").read_text(), ProjectorConfig())
    return {e.tensor_name.split(":")[0]: e for e in config.embeddings}


def read_metadata(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().rstrip("\n").split("\n")]


def decoded_title(store: ItemStore, item: int, tokenizer_folder: Path) -> str:
    """The item's text payload decoded with the tokenizer directly."""
    tokenizer = load_tokenizer(str(tokenizer_folder))[0]
    ids = np.frombuffer(store.payload(item, "text"), dtype="<i4").tolist()
    return tokenizer.decode(ids, skip_special_tokens=True)[:DESCRIBE_CHARS]


def sprite_tile(sprite: np.ndarray, row: int, px: int) -> np.ndarray:
    side = sprite.shape[1] // px
    top, left = (row // side) * px, (row % side) * px
    return sprite[top : top + px, left : left + px]


@pytest.fixture(scope="module")
def cfg(tiny_bert_dir):
    return small_model_config(tiny_bert_dir)


@pytest.fixture(scope="module")
def written(ml_shards, cfg, tmp_path_factory) -> SimpleNamespace:
    """Every item and user of the MovieLens shards written once."""
    inputs = projector_inputs(ml_shards)
    log_dir = tmp_path_factory.mktemp("tensorboard")
    result = write(log_dir, inputs, cfg)
    return SimpleNamespace(inputs=inputs, log_dir=log_dir, result=result, config=read_config(log_dir))


def test_the_config_names_both_tables_and_the_items_sprite(written):
    config = written.config
    assert set(config) == {"items", "users"}
    items, users = config["items"], config["users"]
    assert (items.tensor_path, items.metadata_path) == ("00000/items/tensors.tsv", "00000/items/metadata.tsv")
    assert items.sprite.image_path == "00000/items/sprite.png" and list(items.sprite.single_image_dim) == [32, 32]
    assert (users.tensor_path, users.metadata_path) == ("00000/users/tensors.tsv", "00000/users/metadata.tsv")
    assert users.sprite.image_path == "" and not (written.log_dir / "00000/users/sprite.png").exists()
    n = written.inputs.store.num_items
    assert written.result == {"items": {"written": n, "total": n, "sampled": False, "cap": 5000},
                              "users": {"written": USERS, "total": USERS, "sampled": False, "cap": 1000}}


def test_the_tensors_are_the_vectors(written):
    for tag, vectors in (("items", written.inputs.items), ("users", written.inputs.users)):
        loaded = np.loadtxt(written.log_dir / written.config[tag].tensor_path, delimiter="\t", ndmin=2)
        assert loaded.shape == tuple(vectors.shape)
        assert np.array_equal(loaded.astype(np.float32), vectors.numpy())


def test_the_item_metadata_names_each_item(written):
    inputs, store = written.inputs, written.inputs.store
    rows = read_metadata(written.log_dir / written.config["items"].metadata_path)
    assert rows[0] == ["index", "id", "label", "modality", "train_count"]
    assert len(rows) == store.num_items + 1 and all(len(r) == 5 for r in rows)
    raw = read_id_maps(store.shard_dir)["items"]
    for item in (0, 1, 700, store.num_items - 1):
        index, raw_id, _, modality, count = rows[item + 1]
        assert (index, raw_id, count) == (str(item), raw[item], str(inputs.counts[item]))
        assert modality == store.modality_names[store.modality[item]]
    assert rows[ODD_ID_ITEM + 1][1] == "odd id here"  # a tab or a line break would break the table
    assert rows[1][2].startswith("toy story ( 1995 )")
    assert {r[3] for r in rows[1:]} == {"text", "image"}


def test_an_image_item_is_labelled_by_its_text(written, tiny_bert_dir):
    store = written.inputs.store
    rows = read_metadata(written.log_dir / written.config["items"].metadata_path)
    image_items = np.flatnonzero(store.modality == store.modality_code("image"))
    for item in image_items[:5]:
        assert rows[item + 1][3] == "image"
        assert rows[item + 1][2] == decoded_title(store, int(item), tiny_bert_dir) != ""


def test_the_sprite_shows_the_posters_and_grey_for_text(written):
    store = written.inputs.store
    with Image.open(written.log_dir / written.config["items"].sprite.image_path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        sprite = np.asarray(im)
    side = math.ceil(math.sqrt(store.num_items)) * 32
    assert sprite.shape == (side, side, 3)
    image_code = store.modality_code("image")
    image_item = int(np.flatnonzero(store.modality == image_code)[3])
    text_item = int(np.flatnonzero(store.modality == store.modality_code("text"))[3])
    poster = MODALITIES["image"].thumbnail(bytes(store.payload(image_item, "image")), 32)
    assert np.array_equal(sprite_tile(sprite, image_item, 32), poster)
    assert poster.std() > 10  # a picture, not a flat tile
    grey = sprite_tile(sprite, text_item, 32)
    assert (grey == GREY).all() and 96 <= GREY <= 160  # one flat mid-grey


def test_the_user_metadata(written):
    rows = read_metadata(written.log_dir / written.config["users"].metadata_path)
    assert rows[0] == ["user", "history_length"]
    assert rows[1:] == [[f"user-{u}", str(written.inputs.lengths[u])] for u in range(USERS)]


def sampled_indices(log_dir: Path) -> list[int]:
    return [int(r[0]) for r in read_metadata(log_dir / "00000/items/metadata.tsv")[1:]]


def test_a_cap_writes_a_seeded_sorted_sample(ml_shards, cfg, tmp_path):
    inputs = projector_inputs(ml_shards)
    result = write(tmp_path / "a", inputs, cfg, item_cap=100, user_cap=10, seed=3)
    n = inputs.store.num_items
    assert result == {"items": {"written": 100, "total": n, "sampled": True, "cap": 100},
                      "users": {"written": 10, "total": USERS, "sampled": True, "cap": 10}}
    picked = sampled_indices(tmp_path / "a")
    assert len(picked) == len(set(picked)) == 100 and picked == sorted(picked) and picked != list(range(100))
    tensors = np.loadtxt(tmp_path / "a/00000/items/tensors.tsv", delimiter="\t")
    assert np.array_equal(tensors.astype(np.float32), inputs.items[picked].numpy())
    users = read_metadata(tmp_path / "a/00000/users/metadata.tsv")
    assert len(users) == 11 and [int(r[0].split("-")[1]) for r in users[1:]] == sorted(int(r[0].split("-")[1])
                                                                                      for r in users[1:])
    with Image.open(tmp_path / "a/00000/items/sprite.png") as im:
        assert im.size == (10 * 32, 10 * 32)
    write(tmp_path / "b", inputs, cfg, item_cap=100, user_cap=10, seed=3)
    write(tmp_path / "c", inputs, cfg, item_cap=100, user_cap=10, seed=4)
    assert sampled_indices(tmp_path / "b") == picked != sampled_indices(tmp_path / "c")


def test_mismatched_inputs_are_refused_before_anything_is_written(ml_shards, cfg, tmp_path):
    inputs = projector_inputs(ml_shards)
    n = inputs.store.num_items
    short_counts = SimpleNamespace(**{**vars(inputs), "counts": inputs.counts[:-1]})
    with pytest.raises(ValueError, match=f"item_vectors has {n} rows but train_counts has {n - 1}"):
        write(tmp_path, short_counts, cfg)
    few_ids = SimpleNamespace(**{**vars(inputs), "user_ids": inputs.user_ids[:7]})
    with pytest.raises(ValueError, match=f"user_vectors has {USERS} rows but user_ids has 7"):
        write(tmp_path, few_ids, cfg)
    flat = SimpleNamespace(**{**vars(inputs), "items": inputs.items.reshape(-1)})
    with pytest.raises(ValueError, match=r"item_vectors must be \[rows, d\]"):
        write(tmp_path, flat, cfg)
    some_items = SimpleNamespace(**{**vars(inputs), "items": inputs.items[:10], "codes": inputs.codes[:10],
                                    "counts": inputs.counts[:10], "raw_ids": inputs.raw_ids[:10]})
    with pytest.raises(ValueError, match=f"item_vectors has 10 rows but the shards' items has {n}"):
        write(tmp_path, some_items, cfg)
    with pytest.raises(ValueError, match=f"at most {SPRITE_MAX_PX} px"):
        write(tmp_path, inputs, cfg, item_cap=70_000)  # 265 tiles of 32 px a side
    assert not (tmp_path / "projector_config.pbtxt").exists() and not (tmp_path / "00000").exists()


def test_one_metadata_column_is_written_without_a_header(tmp_path):
    with SummaryWriter(str(tmp_path)) as writer:
        add_table(writer, "solo", torch.eye(3), ("name",), [["a\tb"], ["c"], ["d\ne"]])
    assert (tmp_path / "00000/solo/metadata.tsv").read_text() == "a b\nc\nd e\n"


def test_the_text_hook_describes_and_the_image_hook_draws(ml_shards, cfg):
    text, image = MODALITIES["text"], MODALITIES["image"]
    assert text.thumbnail is None and image.describe is None
    store = ItemStore(ml_shards)
    label = text.describe(bytes(store.payload(0, "text")), cfg)
    assert label.startswith("toy story ( 1995 )") and len(label) <= DESCRIBE_CHARS
    tokenizer = load_tokenizer(str(cfg.text.encoder))[0]
    long_text = tokenizer("Hello there " + "word " * 40, add_special_tokens=True)["input_ids"]
    described = text.describe(np.asarray(long_text, dtype="<i4").tobytes(), cfg)
    assert described.startswith("hello there word word") and len(described) == DESCRIBE_CHARS
    assert "[CLS]" not in described and "[SEP]" not in described

    item = int(np.flatnonzero(store.modality == store.modality_code("image"))[0])
    jpeg = bytes(store.payload(item, "image"))
    thumb = image.thumbnail(jpeg, 32)
    assert thumb.shape == (32, 32, 3) and thumb.dtype == np.uint8
    # the image tower's own input (Pillow reference decoder) is the same picture, normalised
    tower_input = ImageDecoder(backend="pil", size=32).decode([jpeg], [item])
    assert torch.equal(normalize(torch.from_numpy(thumb).permute(2, 0, 1)[None].contiguous()), tower_input)


def test_the_thumbnail_crops_the_centre_of_a_wide_picture():
    picture = np.zeros((20, 60, 3), dtype=np.uint8)
    picture[:, :20] = (255, 0, 0)
    picture[:, 20:40] = (0, 255, 0)
    picture[:, 40:] = (0, 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="JPEG", quality=95)
    thumb = MODALITIES["image"].thumbnail(buffer.getvalue(), 10)
    assert thumb.shape == (10, 10, 3)
    assert (thumb[:, 3:7, 1] > 200).all() and (thumb[:, 3:7, 0] < 60).all() and (thumb[:, 3:7, 2] < 60).all()


def test_an_item_without_a_describable_payload_has_an_empty_label():
    store = SimpleNamespace(modality_names=("text", "image"), has=lambda item, name: False)
    assert item_label(store, 0, 1, None) == ""
