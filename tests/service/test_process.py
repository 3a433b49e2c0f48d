"""Per-process setup of a serving process (service/process.py): once the model is loaded, the objects that
exist then are frozen out of the cyclic garbage collector's reach, only in a serving process."""

from __future__ import annotations

import gc

from service_testing import running, settings, standin_loader

from service import process
from service.app import create_app


def test_the_collector_is_settled_only_in_a_serving_process(monkeypatch):
    monkeypatch.setattr(process, "_serving", False)  # a test process: left as it is
    frozen = gc.get_freeze_count()
    assert not process.settle_after_load() and gc.get_freeze_count() == frozen
    monkeypatch.setattr(process, "_serving", True)
    try:
        assert process.settle_after_load() and gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()


def test_the_app_settles_the_collector_once_the_model_is_loaded(monkeypatch):
    calls = []
    monkeypatch.setattr("service.state.settle_after_load", lambda: calls.append(1))
    with running(create_app(settings(), loader=standin_loader())):
        assert calls == [1]
