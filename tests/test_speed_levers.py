"""The GPU-efficiency switches change speed, not values: SDPA vs eager attention in the text encoder, channels-last
convolutions, the AdamW implementation; each is config, and at its default it leaves experiment run keys as they
were (cached runs stay valid)."""

from __future__ import annotations

import copy

import pytest
import torch

from transrec.trainer.core.config import RunConfig
from transrec.trainer.core.config_records import to_dict
from transrec.trainer.core.overrides import apply_overrides
from transrec.trainer.core.presets import preset
from transrec.trainer.core.towers import ImageTower, TextTower
from transrec.trainer.experiments.run_keys import drop_settings_that_change_nothing
from transrec.trainer.training.loop import adamw_implementation


def test_eager_and_sdpa_attention_agree(tiny_bert_dir):
    torch.manual_seed(0)
    tower = TextTower(str(tiny_bert_dir), d=16, trainable=-1, dropout=0.0).eval()
    ids = torch.randint(1000, 2000, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[1, 6:] = False  # padding must be masked the same way on both paths
    tower.set_attention("sdpa")
    assert tower.bert.config._attn_implementation == "sdpa"
    a = tower({"token_ids": ids, "token_mask": mask})
    tower.set_attention("eager")
    assert tower.bert.config._attn_implementation == "eager"
    b = tower({"token_ids": ids, "token_mask": mask})
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sdpa"):
        tower.set_attention("flash")


def test_channels_last_changes_layout_not_values():
    torch.manual_seed(0)
    tower = ImageTower("resnet18", d=16, trainable=2, dropout=0.0).eval()
    pixels = torch.randn(3, 3, 32, 32)
    want = tower({"pixels": pixels})
    tower.set_channels_last(True)
    conv = next(m for m in tower.blocks.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()  # parameters stay contiguous (DeepSpeed views them as flat bytes)
    assert tower._formatted(pixels).is_contiguous(memory_format=torch.channels_last)
    seen = []
    hook = conv.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
    torch.testing.assert_close(tower({"pixels": pixels}), want, rtol=1e-4, atol=1e-5)
    hook.remove()
    assert seen == [True]  # the convolution ran in channels-last


def test_adamw_implementations_take_the_same_step():
    assert adamw_implementation("auto", torch.device("cpu")) == {}
    assert adamw_implementation("auto", torch.device("cuda")) == {"fused": True}
    steps = []
    for choice in ("auto", "foreach", "plain", "fused"):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(5, 3))
        opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.01, **adamw_implementation(choice, torch.device("cpu")))
        for _ in range(3):
            (w ** 2).sum().backward()
            opt.step()
            opt.zero_grad()
        steps.append(w.detach().clone())
    for other in steps[1:]:
        torch.testing.assert_close(other, steps[0], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="optimizer"):
        RunConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="model.text.attention must be sdpa or eager"):
        apply_overrides(preset("cpu-small"), ["model.text_attention=flash"])  # the flat name of before the sections


def test_levers_at_their_defaults_leave_run_keys_unchanged():
    cfg = to_dict(preset("cpu-small"))
    keyed = drop_settings_that_change_nothing(copy.deepcopy(cfg))
    assert "text_attention" not in keyed["model"] and "channels_last" not in keyed["model"]
    assert not {"compile", "compile_mode", "compile_backend", "cudnn_benchmark"} & set(keyed["model"])
    assert "optimizer" not in keyed and "init_parts" not in keyed
    flipped = to_dict(apply_overrides(preset("cpu-small"), ["model.text_attention=eager", "model.channels_last=true",
                                                            "optimizer=foreach", "model.compile=all"]))
    keyed = drop_settings_that_change_nothing(flipped)
    assert keyed["model"]["text_attention"] == "eager" and keyed["model"]["channels_last"] is True
    assert keyed["optimizer"] == "foreach" and keyed["model"]["compile"] == "all"
