"""The final model in MLflow: logged from the last checkpoint (read with weights_only=True) in
MLflow's `pt2` format, a `torch.export` graph whose loading unpickles no code, and equal to the
trained model on inputs of other batch sizes and sequence lengths than the traced example."""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch

from pipeline.engine.checkpoint import save_checkpoint
from pipeline.engine.models import build_model
from pipeline.tracking import log_model

pytestmark = pytest.mark.mlflow

SPECS = {
    "digits_cnn": {"name": "digits_cnn", "input_dim": 64, "num_outputs": 10, "vocab_size": None},
    "seq_classifier": {"name": "seq_transformer", "input_dim": None, "num_outputs": 3,
                       "vocab_size": 40},
    "seq_per_token": {"name": "seq_transformer", "input_dim": None, "num_outputs": 40,
                      "vocab_size": 40, "per_token": True},
}


def _inputs(spec: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if spec["vocab_size"] is None:
        return {"features": torch.randn(5, 64, generator=g)}
    ids = torch.randint(0, spec["vocab_size"], (5, 13), generator=g)
    mask = torch.arange(13)[None, :] < torch.tensor([13, 9, 1, 5, 13])[:, None]
    return {"input_ids": ids, "attention_mask": mask}


class _CodeUnpickled(AssertionError):
    pass


@contextlib.contextmanager
def no_code_unpickled(monkeypatch):
    """Inside: any unpickling through the `pickle` module -- its Unpickler (which torch.load
    subclasses unless `weights_only`), load and loads -- raises; and through the modules that
    hand torch.load pickle's Unpickler as their own (MLflow's pickle module, cloudpickle's)."""
    class Refusing(pickle.Unpickler):
        def find_class(self, module, name):
            raise _CodeUnpickled(f"unpickled {module}.{name}")

    def refuse(*args, **kwargs):
        raise _CodeUnpickled("pickle.load(s) called")

    import cloudpickle
    import mlflow.pytorch.pickle_module

    with monkeypatch.context() as m:
        for module in (pickle, cloudpickle, mlflow.pytorch.pickle_module):
            for name, value in (("Unpickler", Refusing), ("load", refuse), ("loads", refuse)):
                if hasattr(module, name):
                    m.setattr(module, name, value)
        yield


def _model_files(run_id: str, tmp_path) -> set[str]:
    local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path / "dl"))
    return {p.name for p in Path(local).rglob("*") if p.is_file()}


def _logged(mlflow_server: str, tmp_path, spec: dict, model: torch.nn.Module) -> tuple[str, str]:
    save_checkpoint(tmp_path / "ckpt", {"model": model.state_dict(), "model_spec": spec,
                                        "step": 1, "epoch": 0})
    mlflow.set_tracking_uri(mlflow_server)
    jobs = mlflow.set_experiment("test-model-artifact").experiment_id
    run = mlflow.MlflowClient().create_run(jobs)  # RUNNING, as a job's run is when it logs the model
    # the caller's own MLflow settings (a notebook's): log_model leaves them as they were
    mine = mlflow.set_experiment("test-model-artifact-caller").experiment_id
    elsewhere = "http://127.0.0.1:9"
    mlflow.set_tracking_uri(elsewhere)
    fmt = log_model(mlflow_server, run.info.run_id, tmp_path / "ckpt")
    assert mlflow.get_tracking_uri() == elsewhere == os.environ["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(mlflow_server)
    with mlflow.start_run() as caller_run:
        assert caller_run.info.experiment_id == mine != jobs
    # the job ends the run once result.json is written: logging the model must not end it
    after = mlflow.get_run(run.info.run_id).info
    assert after.status == "RUNNING" and after.end_time is None
    assert mlflow.active_run() is None
    return run.info.run_id, fmt


@pytest.mark.parametrize("which", list(SPECS))
def test_the_logged_model_is_an_exported_graph_equal_to_the_trained_model(mlflow_server, tmp_path,
                                                                          which, monkeypatch):
    spec = SPECS[which]
    torch.manual_seed(0)
    model = build_model(**spec)
    for p in model.parameters():  # not the initial values: the weights must travel
        p.data.add_(0.01 * torch.randn_like(p))
    run_id, fmt = _logged(mlflow_server, tmp_path, spec, model)
    assert fmt == "pt2"
    files = _model_files(run_id, tmp_path)
    assert "model.pt2" in files and "model.pth" not in files, files  # no pickle to load
    with no_code_unpickled(monkeypatch):
        loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    x = _inputs(spec)  # batch 5, length 13: neither is the traced example's (2, 8)
    with torch.no_grad():
        want = model.eval()(x)
        got = loaded(*x.values())
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def untraceable(**kwargs) -> torch.nn.Module:
    """A user model whose forward branches on a value (torch.export refuses it)."""

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(kwargs["input_dim"], kwargs["num_outputs"])

        def forward(self, batch):
            x = batch["features"]
            return self.lin(x) if float(x.sum()) > 0 else -self.lin(x)

    return Branchy()


def test_a_model_that_cannot_be_exported_is_logged_as_pickle_and_says_so(mlflow_server, tmp_path,
                                                                       capsys, monkeypatch):
    spec = {"name": f"import:{__name__}:untraceable", "input_dim": 4, "num_outputs": 2,
            "vocab_size": None}
    model = build_model(**spec)
    run_id, fmt = _logged(mlflow_server, tmp_path, spec, model)
    assert fmt == "pickle"
    assert "cannot be exported" in capsys.readouterr().err
    assert "model.pth" in _model_files(run_id, tmp_path)
    with no_code_unpickled(monkeypatch), pytest.raises(_CodeUnpickled):  # (the guard above can
        mlflow.pytorch.load_model(f"runs:/{run_id}/model")                # see an unpickling)
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    x = {"features": torch.ones(3, 4)}
    torch.testing.assert_close(loaded(x), model(x))


def test_a_failed_upload_is_an_error_not_a_pickled_model(mlflow_server, capsys):
    """Only the export falling back to pickle is said as such: a model that exports, whose
    upload the store refuses (here: no such run), raises the store's error for the caller's
    warning, with no pickle logged in its place."""
    from mlflow.exceptions import RestException

    from pipeline.tracking import _log_model, _mlflow_pointed_at

    spec = {"name": "mlp", "input_dim": 4, "num_outputs": 2, "vocab_size": None}
    exp = mlflow.MlflowClient(mlflow_server).create_experiment("test-model-upload-fails")
    with _mlflow_pointed_at(mlflow_server, exp), pytest.raises(RestException):
        _log_model(build_model(**spec), spec, "0" * 32, requirements=[])
    assert "cannot be exported" not in capsys.readouterr().err
