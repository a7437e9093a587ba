"""Typed configuration: one dataclass per component, and typed changes of a configuration (`changed`).

A run is a preset (`cpu-small`, `paper`, `tiny`: trainer/core/presets.py) plus changes: typed functions inside the
package, `section.key=value` strings on the command line (trainer/core/overrides.py reads them). `ds_configs/*.json`
hold only DeepSpeed's own engine keys (ZeRO, bf16, communication); batch size, optimizer and scheduler come from here
and are filled into the DeepSpeed config by the trainer, which rejects ds_configs that set them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from transrec.data_shards.decode import BACKENDS
from transrec.trainer.core.choices import (
    STAGE1_HEADS,
    STAGE2_LOSSES,
    STAGES,
    Candidates,
    ItemEncoder,
    ObjectiveName,
    UserEncoderName,
    UserState,
)
from transrec.trainer.core.compiled import MODES, PARTS
from transrec.trainer.core.config_checks import check_values, one_of
from transrec.trainer.core.modalities import MODALITIES, default_sections

Change = Callable[["RunConfig"], None]  # sets typed fields of a configuration (see `changed`)

DS_OWNED_BY_TRAINER = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "gradient_clipping",
)


@dataclass
class ModelConfig:
    d: int = 256
    item_encoder: str = "content"  # "content" (TransRec towers) or "id" (IDRec: ID embedding table)
    user_encoder: str = "transformer"  # "transformer" (TransRec/IDRec), "gru" (GRU4Rec), "nextitnet" (NextItNet)
    user_layers: int = 4
    user_heads: int = 4
    max_len: int = 25  # positions of the user encoder (window length)
    # multiplies the item vectors entering the transformer user encoder, before the position embedding is added
    # (SASRec scales its item embeddings by sqrt(d)): how much content, against position, makes up its input
    sequence_input_scale: float = 1.0
    dropout: float = 0.1
    stage1_relu: bool = False  # the paper's ReLU before the catalogue softmax (Eq. 7)
    frozen_towers: bool = False  # frozen mode: towers (incl. pooling and MLPs) never train; features cached once
    side_features: bool = False  # concatenate user / item side features, then project back to d
    activation_checkpointing: bool = False
    kernels: str = "auto"  # "auto" | "triton" | "torch" for every fused op
    temperature: float = 1.0  # content softmax: logits = user . item / temperature
    learn_temperature: bool = False  # train log(1 / temperature) with the model
    compile: str = "none"  # torch.compile of the per-step modules: none | user_encoder | towers | all (compiled.py)
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: traced, not code-generated; debugging)
    # the user state (model.py): "encoder" (the user encoder's last hidden state, the paper's) or "mean_residual"
    # (the mean of the history's item vectors + a learned gate, starting at 0, times the encoder's state)
    user_state: str = "encoder"
    # each registered modality's own settings, `model.<modality>.<field>` (trainer/core/modalities.py), read as
    # `cfg.<modality>`; written to JSON as "model": {..., "<modality>": {...}}
    sections: dict[str, object] = field(default_factory=default_sections)

    def __getattr__(self, name: str):
        """A modality's section, `cfg.text` (only names that are not fields come here)."""
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"ModelConfig has no setting or modality section {name!r}")

    def __setattr__(self, name: str, value) -> None:
        """Only the model's own settings can be set: a modality's is set in its section (`cfg.text.encoder = ...`),
        and a flat name of before the sections (`cfg.text_encoder`) is refused instead of silently doing nothing."""
        if name not in {f.name for f in dataclasses.fields(self)}:
            raise AttributeError(f"ModelConfig has no setting {name!r}: a modality's settings live in its section "
                                 f"(model.<modality>.<setting>; modalities: {', '.join(self.sections)})")
        super().__setattr__(name, value)

    def __post_init__(self) -> None:
        check_values(self, "model", {"d": 1, "user_layers": 1, "user_heads": 1, "dropout": 0})
        if self.dropout >= 1:
            raise ValueError(f"model.dropout must be < 1, not {self.dropout!r}")
        if self.d % self.user_heads:
            raise ValueError(f"d={self.d} must be divisible by user_heads={self.user_heads}")
        if self.item_encoder not in tuple(ItemEncoder):
            raise ValueError("item_encoder must be 'content' or 'id'")
        if self.user_encoder not in tuple(UserEncoderName):
            raise ValueError("user_encoder must be transformer, gru or nextitnet")
        if self.kernels not in ("auto", "triton", "torch"):
            raise ValueError("kernels must be auto, triton or torch")
        one_of("model.compile", self.compile, PARTS)
        one_of("model.user_state", self.user_state, tuple(UserState))
        one_of("model.compile_mode", self.compile_mode, MODES)
        if self.max_len < 3:
            raise ValueError(f"model.max_len must be >= 3, not {self.max_len!r}")
        missing = {name for name, m in MODALITIES.items() if m.config is not None} - set(self.sections)
        if missing:
            raise ValueError(f"model: no settings for the registered modalities {sorted(missing)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.sequence_input_scale <= 0:
            raise ValueError(f"model.sequence_input_scale must be > 0, got {self.sequence_input_scale}")
        if self.sequence_input_scale != 1.0 and self.user_encoder != UserEncoderName.TRANSFORMER:
            raise ValueError("model.sequence_input_scale applies to the transformer user encoder only (it scales "
                             f"content against position embeddings); drop it for user_encoder={self.user_encoder}")


@dataclass
class StageConfig:
    epochs: int = 5
    lr: float = 1e-4
    tower_lr: float = 1e-5  # lower rate for the towers' backbone blocks
    weight_decay: float = 0.01
    warmup_steps: int = 100
    micro_batch: int = 64
    grad_accum: int = 1
    grad_clip: float = 1.0
    # Top blocks of each modality's backbone that train, by modality name (-1: all; a modality left out: 0), e.g.
    # `stage2.trainable.text=1` on the command line.
    trainable: dict[str, int] = field(default_factory=dict)
    n_history: int = 20  # stage 2: history C^u length
    n_continuation: int = 5  # stage 2: continuation C^e length
    negatives: int = 256  # stage 2: shared negatives per batch
    stride: int = 1  # window stride (1: every training position ends a window)
    min_window: int = 0  # shortest training window (0: 2 in stage 1, n_continuation + 1 in stage 2)
    max_steps: int = 0  # 0: no limit (tests and benches cap steps)
    # The content softmax (stage1.head=content, stage2.loss=sampled_softmax; trainer/core/losses.py):
    candidates: str = "auto"  # "full" catalogue | "sampled" (batch items + negatives) | "auto": full if it fits
    full_catalogue_max: int = 4096  # "auto": the full catalogue up to this many items (and every tower cached)
    logq_correction: bool = True  # sampled: logits - log P(candidate)
    mask_history: bool = True  # the user's earlier items are no negatives (as evaluation excludes seen items)
    # Popularity-corrected content softmax (logit adjustment, Menon et al. 2021): training logits + tau * log(item's
    # smoothed share of training interactions), so that the model's own score leaves the source catalogue's popularity
    # out (it does not transfer) and a target's popularity comes back as a scoring prior
    # (trainer/evaluation/scoring.py); 0: off
    popularity_correction: float = 0.0

    def __post_init__(self) -> None:
        section = getattr(self, "section", "stage")
        positive = ("epochs", "micro_batch", "grad_accum", "n_history", "n_continuation", "stride", "negatives",
                    "full_catalogue_max")
        check_values(self, section, {**dict.fromkeys(positive, 1), **dict.fromkeys(
            ("tower_lr", "weight_decay", "warmup_steps", "grad_clip", "min_window", "max_steps",
             "popularity_correction"), 0)})
        if self.lr <= 0:
            raise ValueError(f"{section}.lr must be > 0, not {self.lr!r}")
        one_of("candidates", self.candidates, tuple(Candidates))
        for name, blocks in self.trainable.items():
            if not name.isidentifier() or not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < -1:
                raise ValueError(f"trainable[{name!r}] = {blocks!r}: use a modality name and a block count >= -1")


@dataclass
class Stage1Config(StageConfig):
    """Stage 1: the user encoder pre-trained on next-item softmax over the catalogue. `head=content` scores against
    the towers' item vectors (transferable, ranks cold items); `head=free` is a free W^U [V, d] + b (an ID table)."""

    head: str = "content"
    section = "stage1"

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("stage1.head", self.head, tuple(STAGE1_HEADS))
        if self.popularity_correction and self.head != "content":
            raise ValueError("stage1.popularity_correction corrects the content softmax: it needs stage1.head=content")

    @property
    def objective(self) -> ObjectiveName:
        """The loss component (trainer/core/losses.py) this stage trains with."""
        return STAGE1_HEADS[self.head]


@dataclass
class Stage2Config(StageConfig):
    """Stage 2: end to end. `loss=sampled_softmax`: every position predicts its next item against in-batch and
    shared negative candidates; `loss=cpc`: the paper's Eq. 9 (one user vector per window, BCE)."""

    loss: str = "sampled_softmax"
    section = "stage2"

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("stage2.loss", self.loss, tuple(STAGE2_LOSSES))
        if self.popularity_correction and self.loss != "sampled_softmax":
            raise ValueError("stage2.popularity_correction corrects the content softmax: it needs "
                             "stage2.loss=sampled_softmax")

    @property
    def objective(self) -> ObjectiveName:
        """The loss component (trainer/core/losses.py) this stage trains with."""
        return STAGE2_LOSSES[self.loss]


@dataclass
class EvalConfig:
    exclude_seen: bool = True  # drop the user's own earlier items from the ranking (every model alike)
    ks: tuple[int, ...] = (5, 10, 20)
    item_batch: int = 256
    user_batch: int = 256
    patience: int = 3  # validations without improvement before early stopping (0: off)
    bootstrap: int = 1000
    select: str = "ndcg@10"  # validation metric that picks the best epoch and model: "ndcg@K" or "hr@K", K in ks
    # the user . item score matmuls: "fp32" (exact), "tf32" (on CUDA, TF32 tensor cores: about 8x the fp32 rate,
    # inputs rounded to 10 mantissa bits, so near-tied items may swap; the same as fp32 on CPU)
    precision: str = "fp32"
    # with --init-from: the starting model, scored by content before any training, is a candidate for selection
    # (stage 0), so fine-tuning never ships a model that validates worse than the one it started from
    initial_candidate: bool = False
    # a mixture of catalogues (trainer/training/catalogue_mixture.py): selection reads each metric's mean over
    # catalogues ("macro") or
    # its value over all validation users ("pooled")
    across_catalogues: str = "macro"
    # evaluate a seeded uniform sample of this many users in each split (the same users in both), 0: every evaluated
    # user. For catalogues of millions of users, where ranking them all costs hours; metrics.json's
    # "evaluated_users" records the sample, and every figure and interval is over it.
    max_users: int = 0

    def __post_init__(self) -> None:
        one_of("eval.across_catalogues", self.across_catalogues, ("macro", "pooled"))
        check_values(self, "eval", {"item_batch": 1, "user_batch": 1, "patience": 0, "bootstrap": 1, "max_users": 0})
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"eval.ks must be one or more cut-offs >= 1, not {self.ks!r}")
        one_of("eval.precision", self.precision, ("fp32", "tf32"))
        name, _, k = self.select.partition("@")
        if name not in ("ndcg", "hr") or not k.isdigit() or int(k) not in self.ks:
            raise ValueError(f"eval.select={self.select!r}: use ndcg@K or hr@K with K one of eval.ks {tuple(self.ks)}")


@dataclass
class DataConfig:
    shards: str = "shards/movielens-100k-mm-mixed"
    num_workers: int = 0
    decoder: str = "auto"
    shuffle_buffer: int = 4096
    user_fraction: float = 1.0
    modality_override: str | None = None  # every item read as this modality (an all-"text" or all-"image" view)
    # Folder of frozen lower-block outputs shared across runs (trainer/feature_cache): a path, "auto" (.feature_cache
    # beside the shard folder, when writable) or none.
    feature_store: str | None = "auto"
    split: str = "auto"  # training windows over ranks: "samples" | "shards" (each rank reads its own) | "auto"
    # Batches made ready on the device (copied, decoded) ahead of their step, on a side CUDA stream while the current
    # step runs (trainer/training/device_prefetch.py): -1 = auto (1 on CUDA, 0 elsewhere), 0 = each batch when its turn
    # comes.
    device_prefetch: int = -1
    # a mixture of catalogues (trainer/training/catalogue_mixture.py): catalogue c's share of the training signal is
    # proportional to
    # its training windows to this power (1: every window the same; 0: every catalogue the same)
    mixing_alpha: float = 1.0

    def __post_init__(self) -> None:
        check_values(self, "data", {"num_workers": 0, "shuffle_buffer": 0})
        if not 0 <= self.mixing_alpha <= 1:
            raise ValueError(f"data.mixing_alpha must be in [0, 1], not {self.mixing_alpha!r}")
        if self.modality_override is not None and not self.modality_override.isidentifier():
            raise ValueError(f"modality_override must be a modality name ({', '.join(MODALITIES)}) or none, "
                             f"not {self.modality_override!r}")
        if not 0 < self.user_fraction <= 1:
            raise ValueError("user_fraction must be in (0, 1]")
        one_of("data.split", self.split, ("auto", "samples", "shards"))
        if self.device_prefetch < -1:
            raise ValueError(f"data.device_prefetch must be -1 (auto), 0 (inline) or a number of batches, "
                             f"got {self.device_prefetch}")
        one_of("data.decoder", self.decoder, BACKENDS)


# the training-free candidates first (trainer/transfer/training_free.py), then the trained; a tie on validation goes to
# the
# earlier, so popularity is kept over a prior that only reproduces it, and the start over a prior of beta 0
TRANSFER_CANDIDATES = ("start", "popularity", "content", "prior", "finetune", "lowlr", "towers")


@dataclass
class TransferConfig:
    """How a run with --init-from uses the export (trainer/training/transfer_auto.py). "plain" fine-tunes it once.
    "auto" scores and trains the candidates (with no training: the start itself, the start + the target's popularity
    prior, the training-free content baseline, popularity; trained: plain fine-tuning, fine-tuning at a lower rate, the
    export's towers with a new user encoder; with include_scratch, a model trained from scratch) and keeps the one with
    the best validation: RESULTS.md and reports/README.md show each of them winning on some target."""

    mode: str = "plain"  # "plain" | "auto"
    candidates: str = ",".join(TRANSFER_CANDIDATES)  # auto: which of them, comma-separated
    include_scratch: bool = False  # auto: also train from scratch, so the run says whether the export helped at all
    low_lr: float | None = None  # the lowlr candidate's rate, both stages (None: a tenth of each stage's lr)

    def __post_init__(self) -> None:
        one_of("transfer.mode", self.mode, ("plain", "auto"))
        if isinstance(self.low_lr, str):  # from an override (`transfer.low_lr=0.0001`)
            try:
                self.low_lr = float(self.low_lr)
            except ValueError:
                raise ValueError(f"transfer.low_lr={self.low_lr!r}: give a rate such as 0.0001, or none") from None
        check_values(self, "transfer")
        names = self.named_candidates()
        unknown = [c for c in names if c not in (*TRANSFER_CANDIDATES, "scratch")]
        if unknown or not names:
            raise ValueError(f"transfer.candidates={self.candidates!r}: name one or more of "
                             f"{(*TRANSFER_CANDIDATES, 'scratch')}")
        if self.low_lr is not None and self.low_lr <= 0:
            raise ValueError(f"transfer.low_lr must be > 0 (or none: a tenth of each stage's rate), not {self.low_lr}")

    def named_candidates(self) -> list[str]:
        return [c.strip() for c in self.candidates.split(",") if c.strip()]

    def candidate_names(self) -> list[str]:
        """The candidates named, each once, then scratch when include_scratch and not named already."""
        names = list(dict.fromkeys(self.named_candidates()))
        return names + (["scratch"] if self.include_scratch and "scratch" not in names else [])


@dataclass
class MonitorConfig:
    """What a run records for watching it (TensorBoard, docs/monitoring.md). Nothing here changes what trains: runs
    differing only here train the same model (run keys leave the section out)."""

    grad_norms: bool = True  # the gradient norm of each part of the model, on logging steps
    health_users: int = 500  # validation users whose user vectors are checked for collapse at each validation (0: off)
    projector: bool = True  # the selected model's item vectors and a sample of user vectors for the projector
    projector_items: int = 5000  # items written at most (a seeded sample beyond it)
    projector_users: int = 1000  # user vectors written at most

    def __post_init__(self) -> None:
        check_values(self, "monitor", {"health_users": 0, "projector_items": 1, "projector_users": 1})
        if self.health_users == 1:
            raise ValueError("monitor.health_users compares users with each other: use 2 or more, or 0 (off)")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    stages: str = "all"  # "1", "2", "all", or "none" (no training: evaluate the initial model, e.g. zero-shot)
    seed: int = 0
    run_dir: str | None = None
    init_from: str | None = None
    init_parts: str = "all"  # with init_from: "all", "towers" (user encoder starts new) or "user_encoder"
    # with init_from: comma-separated parameter prefixes that keep this run's own initialisation although the export
    # has them, e.g. "user_encoder.blocks.1" (re-initialise the user encoder's top block)
    init_reset: str = ""
    optimizer: str = "auto"  # AdamW implementation: "auto" (fused on CUDA, torch's default elsewhere) | "fused" |
    # "foreach" | "plain" (one parameter at a time)
    resume: str | None = None
    save_every_steps: int = 200
    log_every: int = 20
    preset: str = "cpu-small"

    def __post_init__(self) -> None:
        check_values(self, "", {"seed": 0, "save_every_steps": 1, "log_every": 1})
        if self.stages not in STAGES:
            raise ValueError(f"--stage must be 1, 2, all or none, not {self.stages!r}")
        one_of("init_parts", self.init_parts, ("all", "towers", "user_encoder"))
        one_of("optimizer", self.optimizer, ("auto", "fused", "foreach", "plain"))
        if self.transfer.mode == "auto" and not self.init_from:
            raise ValueError("transfer=auto chooses how to fine-tune an export: give it with --init-from EXPORT_DIR")
        if self.transfer.mode == "auto" and self.stages == "none":
            raise ValueError("transfer=auto trains candidates; --stage none evaluates the export alone: drop one")


def changed(cfg: RunConfig, *changes: Change) -> RunConfig:
    """A copy of `cfg` with each change applied in order, then checked as a command line's settings are: the way
    presets, transfer candidates and experiment plans vary a configuration. A change is a function that sets typed
    fields of the copy (`def low_rate(c): c.stage1.lr = 1e-4`)."""
    c = copy.deepcopy(cfg)
    for change in changes:
        change(c)
    return checked(c)


def checked(cfg: RunConfig) -> RunConfig:
    """`cfg` after every section's checks (each section's `__post_init__`, the modalities' included) and the run's."""
    sections = [cfg.model, *cfg.model.sections.values(), cfg.stage1, cfg.stage2, cfg.eval, cfg.data, cfg.transfer,
                cfg.monitor]
    for section in sections:
        if hasattr(section, "__post_init__"):
            section.__post_init__()
    cfg.__post_init__()
    return cfg
