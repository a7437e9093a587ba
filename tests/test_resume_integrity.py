"""Resume state and checkpoint integrity: every random generator continues exactly (read back without unpickling
arbitrary objects), and a truncated, altered or missing checkpoint file is named before anything loads."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch

from transrec.trainer.core.checkpoint import (
    CHECKPOINT_HASHES,
    restore_rng,
    rng_state,
    verify_checkpoint,
    write_checkpoint_hashes,
)


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_every_generator_continues_after_a_round_trip_through_a_weights_only_load():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()  # generators somewhere mid-stream
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    want = _draws()
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    buf.seek(0)
    restore_rng(torch.load(buf, weights_only=True))  # tensors and numbers only
    assert _draws() == want
    torch.manual_seed(5)
    legacy = torch.get_rng_state()  # checkpoints before the dict held the torch CPU state alone
    want = float(torch.rand(1))
    restore_rng(legacy)
    assert float(torch.rand(1)) == want


def test_a_damaged_checkpoint_is_named_before_loading(tmp_path, caplog):
    folder = tmp_path / "stage1-epoch0-batch4"
    (folder / "global_step4").mkdir(parents=True)
    (folder / "global_step4" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 1000)
    (folder / "rng_rank0.pt").write_bytes(b"y" * 10)
    write_checkpoint_hashes(folder)
    assert set(json.loads((folder / CHECKPOINT_HASHES).read_text())) == {
        "global_step4/mp_rank_00_model_states.pt", "rng_rank0.pt"}
    verify_checkpoint(folder)  # intact: no error
    (folder / "global_step4" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 500)  # truncated
    with pytest.raises(RuntimeError, match="mp_rank_00_model_states.pt differs"):
        verify_checkpoint(folder)
    (folder / "global_step4" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(RuntimeError, match="mp_rank_00_model_states.pt is missing"):
        verify_checkpoint(folder)
    (folder / CHECKPOINT_HASHES).unlink()  # written by an older version: loaded with a warning
    verify_checkpoint(folder)
    assert "unverified" in caplog.text
