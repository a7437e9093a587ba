"""The trainer's named choices, one name each: the loss components, how an evaluated model scores items, and which
stages a run trains. String enums, so that they compare equal to (and are written to JSON as) the names the
configuration, metrics.json and older run records use.
"""

from __future__ import annotations

from enum import StrEnum


class ObjectiveName(StrEnum):
    """A stage's loss component (trainer/core/losses.py), chosen by `stage1.head` / `stage2.loss`."""

    FREE_HEAD_SOFTMAX = "free_head_softmax"  # the paper's stage 1: softmax over a free catalogue head
    CONTENT_SOFTMAX = "content_softmax"  # user . tower item vectors against the catalogue or sampled candidates
    CPC = "cpc"  # the paper's stage 2 (Eq. 9): one user vector per window, BCE on continuations and negatives


# the configuration's names for them
STAGE1_HEADS = {"content": ObjectiveName.CONTENT_SOFTMAX, "free": ObjectiveName.FREE_HEAD_SOFTMAX}
STAGE2_LOSSES = {"sampled_softmax": ObjectiveName.CONTENT_SOFTMAX, "cpc": ObjectiveName.CPC}


class Scorer(StrEnum):
    """How an evaluated model ranks items. A run selects among the CONTENT models: they rank items never seen in
    training and transfer to other catalogues."""

    CONTENT = "content"  # user vector . the towers' content vector of the item
    ID = "id"  # user vector . the ID table's vector (the ID baselines)
    FREE_HEAD = "free_head"  # stage 1's catalogue head (one output row per item)
    POPULARITY = "popularity"  # no model: the catalogue's most frequent items (a training-free transfer candidate)


class ItemEncoder(StrEnum):
    """`model.item_encoder`: how items become vectors."""

    CONTENT = "content"  # the modality towers over each item's content (TransRec)
    ID = "id"  # an ID embedding table (the IDRec / IDGru / IDNext baselines)


class UserEncoderName(StrEnum):
    """`model.user_encoder`: the sequence encoder over a history's item vectors."""

    TRANSFORMER = "transformer"  # TransRec's (and IDRec's) causal BERT
    GRU = "gru"  # GRU4Rec
    NEXTITNET = "nextitnet"  # NextItNet


class UserState(StrEnum):
    """`model.user_state`: what the user vector is."""

    ENCODER = "encoder"  # the encoder's state at the last position
    MEAN_RESIDUAL = "mean_residual"  # the history's mean item vector + a learned gate x the encoder's state


class Candidates(StrEnum):
    """`stageN.candidates`: the items the content softmax normalises over."""

    FULL = "full"  # the whole catalogue (needs every tower's lower blocks cached)
    SAMPLED = "sampled"  # the batch's items and the shared negatives
    AUTO = "auto"  # full when the catalogue fits stageN.full_catalogue_max and the towers are cached, else sampled


def scorer_of(objective_uses_free_head: bool, item_encoder: str) -> Scorer:
    """The scorer of a model trained with an objective that does or does not rank with the free head."""
    if objective_uses_free_head:
        return Scorer.FREE_HEAD
    return Scorer.CONTENT if item_encoder == ItemEncoder.CONTENT else Scorer.ID


def record_scoring(record: dict) -> Scorer:
    """How a validated model scores; records written before labels existed: stage 1 = free head, else content."""
    return Scorer(record.get("scoring") or (Scorer.FREE_HEAD if int(record["stage"]) == 1 else Scorer.CONTENT))


# `stages` of the configuration -> the stages trained, in order ("none": evaluate the initial model only)
STAGES = {"1": (1,), "2": (2,), "all": (1, 2), "none": ()}
