"""The workers' check of the rows they received against the model the driver's checks sized
(`pipeline.worker.data_outside_model`): data changed between the checks and the ingest is
refused in one line instead of failing in the model (an IndexError Ray Train would retry)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import load_config
from pipeline.data.batches import SampleTable
from pipeline.worker import data_outside_model, model_spec

FACTS = {"input_dim": None, "max_token": 9, "max_target": 3, "max_label": 2}


def _sequences(tokens, targets):
    table = pa.table({"tokens": tokens, "targets": targets, "label": [0] * len(tokens)})
    return SampleTable.from_table(table, feature_column=None, label_column="label",
                                  sequence_column="tokens", target_column="targets")


@pytest.mark.parametrize(("tokens", "targets", "loss", "want"), [
    ([[1, 9], [0]], [[3, 0], [1]], "token_cross_entropy", None),  # what the checks saw
    ([[1, 10], [0]], [[3, 0], [1]], "token_cross_entropy",
     "token id 10, the model's vocabulary has 10"),
    ([[1, 9], [0]], [[4, 0], [1]], "token_cross_entropy",
     "target token 4, the model has 4 outputs"),
    ([[1, 9], [0]], [[4, 0], [1]], "cross_entropy", None),  # targets unused by this loss
])
def test_sequences_outside_the_model_are_named(tokens, targets, loss, want):
    cfg = load_config(None, ["data.name=sequences", f"train.loss={loss}", "model.name=seq_transformer"])
    spec = model_spec(cfg, FACTS)
    assert data_outside_model(cfg, spec, _sequences(tokens, targets)) == want


def test_features_of_another_width_and_labels_beyond_the_outputs():
    cfg = load_config(None, ["model.name=mlp", "data.feature_column=x"])
    spec = model_spec(cfg, {**FACTS, "input_dim": 4, "max_token": None})
    table = pa.table({"x": list(np.zeros((3, 5), np.float32)), "y": [0, 1, 2]})
    st = SampleTable.from_table(table, feature_column="x", label_column="y")
    assert data_outside_model(cfg, spec, st) == "5 features, the model takes 4"
    table = pa.table({"x": list(np.zeros((3, 4), np.float32)), "y": [0, 1, 3]})
    st = SampleTable.from_table(table, feature_column="x", label_column="y")
    assert data_outside_model(cfg, spec, st) == "label 3, the model has 3 outputs"
