"""Test-wide set-up.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so that ``impl="triton"``
on CPU tensors runs the kernels through the Triton interpreter (how CI proves them without a GPU).
On a machine with CUDA the variable is left unset so the same tests run the compiled kernels.
"""

import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel tests on CUDA launch the heuristic tiling (each test's shapes would otherwise time every candidate);
# tests/test_kernel_tuning.py switches the timing on where it tests it, and every candidate is tested on its own.
os.environ.setdefault("TRANSREC_KERNEL_AUTOTUNE", "0")
# Records of verified shard folders (data_shards/integrity.py) and URL shard copies go to a folder of this test
# session, not the user's cache.
if "TRANSREC_SHARD_CACHE" not in os.environ:
    _shard_cache = tempfile.mkdtemp(prefix="transrec-shard-cache-")
    os.environ["TRANSREC_SHARD_CACHE"] = _shard_cache
    atexit.register(shutil.rmtree, _shard_cache, ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with random weights and the all-MiniLM-L6-v2 tokenizer files (same vocabulary
    as the shards): the trainer's real text-tower code path at a size that makes tests fast."""
    import shutil

    from transformers import BertConfig, BertModel

    from transrec.trainer.core.towers import minilm_path

    out = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
        ),
        add_pooling_layer=False,
    ).save_pretrained(out)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = Path(minilm_path()) / name
        if src.exists():
            shutil.copy(src, out / name)
    return out


def _build(out: Path, dataset: str, source: Path, modality: str = "mixed", max_tokens: int = 16,
           users_per_shard: int = 1000) -> Path:
    from transrec.data_shards.build import BuildOptions, build

    if not (out / "manifest.json").exists():
        build(BuildOptions(dataset=dataset, source=source, out=out, modality=modality, max_tokens=max_tokens,
                           users_per_shard=users_per_shard))
    return out


@pytest.fixture(scope="session")
def build_in_shards(tmp_path_factory):
    """build_in_shards(dataset, users_per_shard): a bundled dataset ("movielens-100k-mm" or "hm-fashion") built
    with that many users a sequence shard (several shards: what the per-rank shard splits need)."""
    def build(dataset: str, users_per_shard: int) -> Path:
        source = REPO / "data" / {"movielens-100k-mm": "movielens-100k-mm", "hm-fashion": "hm-fashion-fixture"}[dataset]
        return _build(tmp_path_factory.mktemp("many") / dataset, dataset, source, users_per_shard=users_per_shard)

    return build


@pytest.fixture(scope="session")
def ml_shards(tmp_path_factory) -> Path:
    """MovieLens-100k-mm (bundled), mixed modality, 16 tokens per text."""
    return _build(tmp_path_factory.mktemp("shards") / "ml", "movielens-100k-mm", REPO / "data" / "movielens-100k-mm")


@pytest.fixture(scope="session")
def hm_shards(tmp_path_factory) -> Path:
    """The bundled H&M fixture (200 customers), mixed modality."""
    return _build(tmp_path_factory.mktemp("shards") / "hm", "hm-fashion", REPO / "data" / "hm-fashion-fixture")


def pytest_report_header(config) -> str:
    """Where the Triton kernel tests run, in the session header (a test that only prints proves nothing)."""
    from transrec.kernels.testing import describe_devices

    return f"Triton kernel tests run on: {describe_devices()}"


def small_model_config(text_encoder: Path, **settings):
    """A 16-wide model over the tiny BERT (16 tokens) and 32-px images, `settings` on top (d, dropout, kernels, ...)."""
    from transrec.trainer.core.config import ModelConfig
    from transrec.trainer.core.modalities import ImageConfig, TextConfig

    base = {"d": 16, "user_layers": 2, "user_heads": 2, "max_len": 8}
    return ModelConfig(**{**base, **settings}, sections={"text": TextConfig(encoder=str(text_encoder), max_tokens=16),
                                                          "image": ImageConfig(size=32)})


def content_options(max_tokens: int = 16, decoder=None, **others):
    """Collating options for tests: `max_tokens` text tokens, image pixels from `decoder` (None: JPEG bytes), every
    other registered modality at its kind's defaults (or as given in `others`, by name)."""
    from transrec.data_shards.modalities import ContentOptions, ContentSettings, TextSettings

    defaults = ContentSettings().options("cpu", decode=False).by_modality
    return ContentOptions({**defaults, "text": TextSettings(max_tokens=max_tokens), "image": decoder, **others})


def image_content(size: int = 32, backend: str = "pil", max_tokens: int = 16):
    """A loader's content settings for tests: images of `size` px by `backend`, `max_tokens` text tokens."""
    from transrec.data_shards.modalities import ContentSettings, ImageSettings, TextSettings

    return ContentSettings({"image": ImageSettings(size=size, backend=backend), "text": TextSettings(max_tokens)})


def tiny_trainer(shards: Path, text_encoder: Path, run_dir: Path, *overrides: str):
    """An in-process Trainer of the tiny preset on the given shards, with extra `section.key=value` overrides."""
    from transrec.trainer.core.overrides import apply_overrides
    from transrec.trainer.core.presets import preset
    from transrec.trainer.training.loop import Trainer

    base = [f"data.shards={shards}", f"model.text_encoder={text_encoder}", f"run_dir={run_dir}"]
    cfg = apply_overrides(preset("tiny"), [*base, *overrides])
    return Trainer(cfg, str(REPO / "ds_configs" / "zero2.json"))


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, ml_shards, tiny_bert_dir) -> Path:
    """One two-stage run in-process on MovieLens (tiny preset), shared by several tests."""
    from transrec.trainer.main import main

    run_dir = tmp_path_factory.mktemp("runs") / "source"
    metrics = main(
        [
            "--preset",
            "tiny",
            "--shards",
            str(ml_shards),
            "--text-encoder",
            str(tiny_bert_dir),
            "--run-dir",
            str(run_dir),
            "--ds_config",
            str(REPO / "ds_configs" / "zero2.json"),
        ]
    )
    assert metrics is not None
    return run_dir


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, tiny_bert_dir) -> Path:
    """A small catalogue of text and image items (test_serving.build_catalogue), one per test module."""
    from test_serving import build_catalogue

    return build_catalogue(tmp_path_factory.mktemp("catalogue"), tiny_bert_dir)


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny_bert_dir) -> Path:
    """An export of a tiny model with seeded random weights (test_serving.build_export), one per test module."""
    from test_serving import build_export

    return build_export(tmp_path_factory.mktemp("export") / "export", tiny_bert_dir)
