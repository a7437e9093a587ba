"""A run's TensorBoard events: read from the event file of a tiny two-stage run (every tag docs/monitoring.md lists,
validation inside the training steps, per-stage tags apart, the HParams row, the Custom Scalars layout, the
projector), and served by the real TensorBoard backend (tests/tensorboard_server.py), read back over HTTP: the tags
are served, and the served points are the event file's and the loss CSV's. A resumed run's steps neither repeat nor
jump: tests/test_tensorboard_resume.py.

TensorBoard is started with --logdir on the run directory, not on its tensorboard/ folder: the event files then
form the run "tensorboard" (their folder relative to the logdir) instead of the run ".".
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard_server import (
    TensorBoardURL,
    get_json,
    hparams_summaries,
    port_answers,
    post_json,
    runs,
    scalar_series,
    scalar_tags,
    serve_tensorboard,
)

RUN = "tensorboard"  # the run name of <run_dir>/tensorboard/events.* under --logdir <run_dir>

PHASES = ["loader_wait", "to_device", "forward", "backward", "optimizer", "checkpoint"]
# Tags logged on training logging steps by the tiny preset's two-stage run (trainer/monitoring/metric_log.py).
TRAINING_TAGS = [
    "train/stage1_loss", "train/stage2_loss", "train/lr", "lr/main", "lr/tower_backbones",
    "perf/sequences_per_s", "perf/items_encoded_per_s", "perf/items_per_step", "perf/cache_hit_share", "mem/peak_gib",
    "time/step_s", "time/accounted_share", *(f"time/{p}_s" for p in PHASES),
    "grad_norm/user_encoder", "grad_norm/towers.text", "grad_norm/towers.image",
]
# Tags logged at each validation, per stage, and popularity's reference line.
VALIDATION_TAGS = [
    *(f"eval/stage{s}/{m}" for s in (1, 2) for m in ("ndcg@10", "hr@10")), "eval/popularity/ndcg@10",
    *(f"health/stage{s}/{f}" for s in (1, 2) for f in ("mean_pairwise_cosine", "effective_rank", "same_top10_share")),
]
RUN_TAGS = ["hparams/valid_ndcg@10", "hparams/test_ndcg@10", "hparams/best_stage"]  # the HParams row's figures

# Tags that a two-stage run's TensorBoard must serve.
SERVED_TAGS = [*TRAINING_TAGS, *VALIDATION_TAGS, *RUN_TAGS]

# Tags whose served points are compared with the event file read directly.
COMPARED_TAGS = ["train/stage1_loss", "eval/stage1/ndcg@10"]


@pytest.fixture(scope="module")
def tensorboard(source_run: Path):
    with serve_tensorboard(source_run, expect_run=RUN) as base:
        print(f"TensorBoard up in {base.startup_s:.2f} s at {base}")
        yield base


@pytest.fixture(scope="module")
def event_file_scalars(source_run: Path):
    """The run's scalar events read from its event files directly (every point kept: size guidance 0)."""
    accumulator = event_accumulator.EventAccumulator(str(source_run / "tensorboard"),
                                                     size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return accumulator


def test_the_run_and_its_tags_are_served(tensorboard):
    assert RUN in runs(tensorboard)
    tags = scalar_tags(tensorboard)
    assert RUN in tags, f"no scalars served for run {RUN!r}: {sorted(tags)}"
    missing = [tag for tag in SERVED_TAGS if tag not in tags[RUN]]
    assert not missing, f"not served: {missing}; served: {tags[RUN]}"


@pytest.mark.parametrize("tag", COMPARED_TAGS)
def test_served_points_are_the_event_files(tensorboard, event_file_scalars, tag):
    served = scalar_series(tensorboard, RUN, tag)
    direct = [(e.step, e.value) for e in event_file_scalars.Scalars(tag)]
    assert served, f"no points served for {tag}"
    assert [step for step, _ in served] == [step for step, _ in direct]
    assert [value for _, value in served] == pytest.approx([value for _, value in direct])


def test_served_stage1_loss_is_the_loss_csv(tensorboard, source_run):
    """Stage 1 is the run's first stage: its TensorBoard x (the run's optimizer step) is the CSV's stage step."""
    with open(source_run / "loss_stage1.csv") as f:
        rows = [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(f)]
    served = scalar_series(tensorboard, RUN, "train/stage1_loss")
    assert rows
    assert [step for step, _ in served] == [step for step, _ in rows]
    assert [value for _, value in served] == pytest.approx([loss for _, loss in rows], abs=1e-6)


def test_the_hparams_layout_and_projector_are_served(tensorboard):
    """The HParams tab's experiment (the run's settings and metric columns), the Custom Scalars layout and the
    projector's run, as the real backend serves them to the browser."""
    experiment = post_json(tensorboard, "/data/plugin/hparams/experiment", {"experimentName": ""})
    assert "stage1.lr" in {h["name"] for h in experiment["hparamInfos"]}
    assert {m["name"]["tag"] for m in experiment["metricInfos"]} >= {"hparams/valid_ndcg@10", "hparams/test_ndcg@10"}
    layout = get_json(tensorboard, "/data/plugin/custom_scalars/layout")
    assert [c["title"] for c in layout["category"]][0] == "validation"
    assert RUN in get_json(tensorboard, "/data/plugin/projector/runs")


def test_the_server_is_gone_after_the_block(source_run):
    with serve_tensorboard(source_run, expect_run=RUN) as base:
        assert isinstance(base, TensorBoardURL)
        process = base.process
        assert process.poll() is None and port_answers(base)
    assert process.poll() is not None
    with pytest.raises(ProcessLookupError):  # reaped: the pid is no process any more
        os.kill(process.pid, 0)
    assert not port_answers(base)


# -- the event file -------------------------------------------------------------------------------------------------
def steps(accumulator, tag: str) -> list[int]:
    return [e.step for e in accumulator.Scalars(tag)]


def test_the_event_file_has_every_tag(event_file_scalars):
    missing = [tag for tag in SERVED_TAGS if tag not in event_file_scalars.Tags()["scalars"]]
    assert not missing, f"not logged: {missing}"


def test_validation_lies_inside_the_training_steps_and_each_stage_apart(event_file_scalars):
    train = sorted(steps(event_file_scalars, "train/stage1_loss") + steps(event_file_scalars, "train/stage2_loss"))
    for tag in VALIDATION_TAGS:
        points = steps(event_file_scalars, tag)
        assert points == sorted(set(points)), f"{tag}: steps repeat or go back: {points}"
        assert train[0] <= points[0] and points[-1] <= train[-1], f"{tag} {points} outside training {train}"
    stage1 = steps(event_file_scalars, "eval/stage1/ndcg@10")
    stage2 = steps(event_file_scalars, "eval/stage2/ndcg@10")
    assert stage1[-1] < steps(event_file_scalars, "train/stage2_loss")[0] <= stage2[0]
    # popularity's line has a point at every validation of either stage, always the same value
    popularity = event_file_scalars.Scalars("eval/popularity/ndcg@10")
    assert [e.step for e in popularity] == sorted(stage1 + stage2)
    assert len({e.value for e in popularity}) == 1
    for s, points in ((1, stage1), (2, stage2)):
        assert steps(event_file_scalars, f"health/stage{s}/mean_pairwise_cosine") == points


def test_logging_steps_carry_the_time_breakdown_and_model_health(event_file_scalars, source_run):
    loss_steps = sorted(steps(event_file_scalars, "train/stage1_loss") + steps(event_file_scalars, "train/stage2_loss"))
    for tag in ("time/step_s", "time/forward_s", "perf/cache_hit_share", "grad_norm/user_encoder", "lr/main"):
        assert steps(event_file_scalars, tag) == loss_steps, tag
    # the tiny preset caches both towers' frozen blocks: every encoded item's lower blocks come from the cache
    assert {e.value for e in event_file_scalars.Scalars("perf/cache_hit_share")} == {1.0}
    # the backbones' group exists only in stage 2, where the towers' top blocks train
    stage2 = steps(event_file_scalars, "train/stage2_loss")
    assert steps(event_file_scalars, "lr/tower_backbones") == stage2
    # the phases are parts of the step: their sum is the accounted share of the step time, at most all of it
    for i, share in enumerate(event_file_scalars.Scalars("time/accounted_share")):
        parts = sum(event_file_scalars.Scalars(f"time/{p}_s")[i].value for p in PHASES)
        step = event_file_scalars.Scalars("time/step_s")[i].value
        assert share.value == pytest.approx(parts / step, rel=1e-5)
        assert 0.5 < share.value <= 1.0


def test_the_run_writes_its_hparams_row(source_run):
    from transrec.trainer.core.config_records import read_run_config

    found = hparams_summaries(source_run / "tensorboard")
    assert set(found) == {"experiment", "session_start_info", "session_end_info"}
    start = found["session_start_info"].session_start_info.hparams
    cfg = read_run_config(source_run)
    assert start["stage1.lr"].number_value == pytest.approx(cfg.stage1.lr)
    assert start["preset"].string_value == "tiny"
    assert start["init_from"].string_value == "none"
    metrics = [m.name.tag for m in found["experiment"].experiment.metric_infos]
    assert "hparams/test_ndcg@10" in metrics and "hparams/valid_ndcg@10" in metrics


def test_the_hparams_figures_are_the_runs_metrics(event_file_scalars, source_run):
    metrics = json.loads((source_run / "metrics.json").read_text())
    assert event_file_scalars.Scalars("hparams/test_ndcg@10")[0].value == pytest.approx(metrics["test"]["ndcg@10"])
    assert event_file_scalars.Scalars("hparams/valid_ndcg@10")[0].value == pytest.approx(metrics["valid"]["ndcg@10"])
    assert event_file_scalars.Scalars("hparams/best_stage")[0].value == metrics["best"]["stage"]


def test_the_projector_has_the_item_and_user_vectors(source_run):
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    board = source_run / "tensorboard"
    config = text_format.Parse((board / "projector_config.pbtxt").read_text(), ProjectorConfig())
    by_tag = {e.tensor_name.split(":")[0]: e for e in config.embeddings}
    assert set(by_tag) == {"items", "users"}
    items = (board / by_tag["items"].metadata_path).read_text().splitlines()
    assert items[0].split("\t") == ["index", "id", "label", "modality", "train_count"]
    num_items = json.loads((source_run / "run_config.json").read_text())
    assert len(items) - 1 == len(json.loads((Path(num_items["config"]["data"]["shards"]) / "id_maps.json")
                                            .read_text())["items"])
    assert by_tag["items"].sprite.image_path and list(by_tag["items"].sprite.single_image_dim) == [32, 32]


def test_the_custom_scalars_layout_is_written(source_run):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    plugins = {value.metadata.plugin_data.plugin_name
               for path in (source_run / "tensorboard").glob("events.out.tfevents.*")
               for event in EventFileLoader(str(path)).Load() for value in event.summary.value}
    assert "custom_scalars" in plugins
