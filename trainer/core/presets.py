"""The named starting configurations (`--preset`): a run is a preset plus typed changes (`--set section.key=value`
on the command line).

- cpu-small: sized for 2 CPU cores (~10 minutes for both stages on MovieLens-100k), the default;
- paper: the paper's settings (BERT-base shape, ResNet-18 at 224 px, batch 512), for GPUs;
  (each registered modality adds its own settings to each preset: trainer/core/modalities.py)
- tiny: seconds per stage, for tests.
"""

from __future__ import annotations

from transrec.trainer.core.config import (
    EvalConfig,
    ModelConfig,
    RunConfig,
    Stage1Config,
    Stage2Config,
    changed,
)
from transrec.trainer.core.modalities import preset_changes


def cpu_small() -> RunConfig:
    # Sized for 2 CPU cores (~10 minutes for both stages on MovieLens-100k): frozen backbones cached in stage
    # 1; stage 2 trains the top text layer and the top image block from cached lower outputs. Windows are
    # non-overlapping (stride = window), so every training position is a target once per epoch. Higher
    # learning rates than the paper for the short schedule.
    return RunConfig(
        # The content softmax's temperature is learned: on the bundled MovieLens, stage-1 validation NDCG@10 0.1197
        # and 0.1212 in two runs, against 0.1103-0.1138 in six runs with it fixed at 1 (RESULTS.md). The towers'
        # settings (the image backbone and size, text length, trainable blocks) are the modalities' own presets
        # (trainer/core/modalities.py).
        model=ModelConfig(d=256, user_layers=2, user_heads=4, max_len=25, learn_temperature=True),
        stage1=Stage1Config(epochs=10, lr=1e-3, micro_batch=128, warmup_steps=20, stride=25),
        stage2=Stage2Config(
            epochs=1,
            lr=3e-4,
            tower_lr=3e-5,
            micro_batch=128,
            n_history=20,
            n_continuation=5,
            negatives=256,
            stride=25,
            warmup_steps=10,
        ),
        preset="cpu-small",
    )


def paper() -> RunConfig:
    # The paper's settings: BERT-base shape, ResNet-18 at 224 px, d=256, Adam lr 1e-4, batch 512, length 25;
    # the official code trains the top two blocks of each backbone.
    return RunConfig(
        model=ModelConfig(
            d=256,
            user_layers=4,
            user_heads=4,
            max_len=25,
            activation_checkpointing=True,
        ),
        stage1=Stage1Config(epochs=10, lr=1e-4, micro_batch=512),
        stage2=Stage2Config(
            epochs=10,
            lr=1e-4,
            tower_lr=1e-5,
            micro_batch=512,
            n_history=20,
            n_continuation=5,
            negatives=4096,
            stride=5,
        ),
        eval=EvalConfig(user_batch=4096),  # a GPU's evaluation: thousands of users per score matmul
        preset="paper",
    )


def tiny() -> RunConfig:
    # For tests: seconds per stage.
    return RunConfig(
        model=ModelConfig(d=32, user_layers=1, user_heads=2, max_len=8, dropout=0.0),
        stage1=Stage1Config(epochs=1, lr=1e-3, micro_batch=16, warmup_steps=2, max_steps=6, stride=4),
        stage2=Stage2Config(
            epochs=1,
            lr=1e-3,
            tower_lr=1e-3,
            micro_batch=8,
            n_history=5,
            n_continuation=2,
            negatives=16,
            stride=4,
            warmup_steps=2,
            max_steps=4,
        ),
        eval=EvalConfig(bootstrap=100),
        save_every_steps=3,
        log_every=2,
        preset="tiny",
    )


PRESETS = {"cpu-small": cpu_small, "paper": paper, "tiny": tiny}


def preset(name: str) -> RunConfig:
    """The preset's configuration, with what each registered modality adds to it (its section, trainable blocks)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose {', '.join(PRESETS)}")
    return changed(PRESETS[name](), *preset_changes(name))
