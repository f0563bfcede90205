"""The markers mean what they say: tests/conftest.py refuses a test session in which a test uses
the session's Ray cluster or MLflow server without the `ray` / `mlflow` marker (the pure tier,
`-m "not ray and not mlflow and not slow"`, would start them), or carries one without using it."""

from __future__ import annotations

import pytest

from tests.conftest import marker_problems, pytest_collection_modifyitems


class _Item:
    def __init__(self, nodeid: str, fixturenames: list[str], markers: list[str]):
        self.nodeid, self.fixturenames, self._markers = nodeid, fixturenames, markers

    def get_closest_marker(self, name: str):
        return getattr(pytest.mark, name) if name in self._markers else None


def test_matching_markers_pass():
    items = [_Item("pure", ["tmp_path", "data_dir"], []),
             _Item("ray", ["ray_client", "ray_cluster", "data_dir"], ["ray"]),
             _Item("both", ["sweep", "ray_cluster", "mlflow_server"], ["ray", "mlflow", "slow"])]
    assert marker_problems(items) == []
    pytest_collection_modifyitems(None, items)  # no error


def test_a_fixture_without_its_marker_fails_collection():
    items = [_Item("t::a", ["sweep", "ray_cluster", "mlflow_server"], ["mlflow"]),
             _Item("t::b", ["mlflow_server"], [])]
    assert marker_problems(items) == [
        "t::a: uses ray_cluster without @pytest.mark.ray",
        "t::b: uses mlflow_server without @pytest.mark.mlflow"]
    with pytest.raises(pytest.UsageError, match="t::a: uses ray_cluster without"):
        pytest_collection_modifyitems(None, items)


def test_a_marker_without_its_fixture_fails_collection():
    items = [_Item("t::c", ["tmp_path"], ["ray", "slow"])]
    assert marker_problems(items) == ["t::c: marked ray but does not use ray_cluster"]
    with pytest.raises(pytest.UsageError, match="t::c: marked ray but does not use"):
        pytest_collection_modifyitems(None, items)

