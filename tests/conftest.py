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


def _fixture_digests() -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(FIXTURES.iterdir()) if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def _fixtures_untouched():
    """No conversion may write over its input: the committed fixtures are byte-identical after
    the tests (onnx2tf, for one, saves over its -i file when it is given the user's model)."""
    before = _fixture_digests()
    yield
    after = _fixture_digests()
    changed = sorted(n for n in before if after.get(n) != before[n])
    added = sorted(set(after) - set(before))
    assert not changed and not added, f"tests changed fixtures/: {changed} added: {added}"
