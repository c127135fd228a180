from __future__ import annotations

from pathlib import Path

import pytest

from mtconvert.registry import Registry
from tests.fake_backend import (FakeBackend, FixedShapeFakeBackend, OtherFakeBackend,
                                TracedFakeBackend)
from tests.models import tiny_encoder

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_encoder(tmp_path_factory.mktemp("models") / "tiny.onnx")


@pytest.fixture
def fake_registry() -> Registry:
    reg = Registry()
    reg.register(FakeBackend)
    reg.register(OtherFakeBackend)
    reg.register(FixedShapeFakeBackend)
    reg.register(TracedFakeBackend)
    return reg


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Tests never touch the user's cache; each test starts with an empty one."""
    monkeypatch.setenv("MTCONVERT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
