import pytest

from mtconvert.errors import UnknownTargetError
from mtconvert.registry import BackendEntry, DuplicateBackendError, Registry, default_registry
from tests.fake_backend import FakeBackend


def test_builtin_onnx_mobile_registered_through_entry_points():
    reg = default_registry()
    assert "onnx-mobile" in reg.names()
    assert reg.entries["onnx-mobile"].dist == "mtconvert"
    assert reg.resolve("ort") == "onnx-mobile" and reg.resolve("ONNX-Mobile") == "onnx-mobile"


def test_unknown_target_lists_known(fake_registry):
    with pytest.raises(UnknownTargetError) as exc:
        fake_registry.resolve("tflitee")
    assert "fake" in str(exc.value) and "phony" in str(exc.value)


def test_broken_plugin_is_reported_not_fatal(fake_registry):
    fake_registry.add(BackendEntry("broken", "no_such_module_xyz:Backend", "broken-dist"))
    from mtconvert.backends_info import describe_backends

    rows = {r["name"]: r for r in describe_backends(fake_registry)}
    assert "ModuleNotFoundError" in rows["broken"]["error"]
    assert rows["fake"]["can_convert"] and rows["fake"]["aliases"] == ["phony"]
    assert fake_registry.available() == ["fake", "fake2", "fake-fixed", "fake-traced"]


def test_duplicate_names_name_both_distributions():
    reg = Registry()
    reg.add(BackendEntry("x", "a:A", "dist-a"))
    with pytest.raises(DuplicateBackendError, match="dist-a.*dist-b"):
        reg.add(BackendEntry("x", "b:B", "dist-b"))


def test_entry_point_name_must_match_class_name():
    reg = Registry()
    reg.add(BackendEntry("wrong", f"{FakeBackend.__module__}:FakeBackend"))
    assert reg.available() == []
    assert "declares name" in reg.entries["wrong"].error


def test_a_module_hidden_in_sys_modules_is_still_installed(monkeypatch):
    """The coreml backend hides tensorflow from coremltools (sys.modules entry None) for a
    moment; another target's availability check in a parallel thread must not call it
    missing (seen: tflite 'needs tensorflow' in a run with coreml)."""
    import sys

    from mtconvert import deps

    monkeypatch.setitem(sys.modules, "json", None)
    assert deps.module_present("json")
    monkeypatch.setitem(sys.modules, "surely_not_installed_mod", None)
    assert not deps.module_present("surely_not_installed_mod")
