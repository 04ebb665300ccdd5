"""The Model Registry agrees with the report after an interruption anywhere in the registration.

A real MLflow sqlite store. The registration is interrupted (as a kill or a SIGTERM would: an exception out of
the call) right after each MLflow call that changes the registry, then run again as the rerun of the report
stage would: the result is the one an uninterrupted registration gives, and the registry holds one version per
model, with the aliases the result names."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tokenbridge import tracking

NAME = "tokenbridge-student"


class Interrupted(KeyboardInterrupt):
    """What a kill or a stop signal leaves: the call never returns."""


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure("registry-test")
    yield MlflowClient()
    mlflow.end_run()


def _register(model_dir, value: float) -> dict:
    with mlflow.start_run():
        return tracking.register_candidate(model_dir, NAME, "gsm_exact_match", value, higher_is_better=True)


def _interrupt_after(monkeypatch, owner, method: str, calls: int) -> None:
    """Let `calls` calls of `owner.method` through, then interrupt right after the next one returns."""
    original = getattr(owner, method)
    seen = []

    def interrupted(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(1)
        if len(seen) > calls:
            raise Interrupted(f"after {method}")
        return result

    monkeypatch.setattr(owner, method, interrupted)


@pytest.mark.parametrize("point", ["registered", "candidate alias", "champion alias"])
def test_a_registration_interrupted_anywhere_then_rerun_gives_one_version_and_the_same_decision(
        tiny_dirs, store, monkeypatch, point):
    first = _register(tiny_dirs["student"], 0.1)
    assert first == {"model": NAME, "version": 1, "candidate": True, "champion_moved": True, "champion_version": 1,
                     "reason": "beats the champion: no champion yet"}
    with monkeypatch.context() as patch:
        if point == "registered":
            _interrupt_after(patch, mlflow, "register_model", 0)
        else:
            _interrupt_after(patch, MlflowClient, "set_registered_model_alias", 0 if point == "candidate alias" else 1)
        with pytest.raises(Interrupted):
            _register(tiny_dirs["teacher"], 0.3)
    rerun = _register(tiny_dirs["teacher"], 0.3)
    assert rerun == {"model": NAME, "version": 2, "candidate": True, "champion_moved": True, "champion_version": 2,
                     "reason": "beats the champion: 0.3 vs champion 0.1 on gsm_exact_match"}
    assert len(store.search_model_versions(f"name='{NAME}'")) == 2
    assert store.get_registered_model(NAME).aliases == {"candidate": 2, "champion": 2}


def test_registering_the_same_weights_again_keeps_their_version_and_its_decision(tiny_dirs, store):
    _register(tiny_dirs["student"], 0.2)
    worse = _register(tiny_dirs["teacher"], 0.1)
    assert worse["champion_moved"] is False and worse["champion_version"] == 1
    again = _register(tiny_dirs["teacher"], 0.1)
    assert again == worse
    assert store.get_registered_model(NAME).aliases == {"candidate": 2, "champion": 1}
    assert len(store.search_model_versions(f"name='{NAME}'")) == 2
