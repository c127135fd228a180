"""What mtconvert refuses to read: pickle payloads (loading one can run arbitrary code) unless
the user trusts the file, and ONNX external data outside the model's folder."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

from mtconvert.errors import ModelLoadError

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".bin")
TRUST_HINT = ("export it with torch.export.save (.pt2) or to ONNX, or pass --trust-pickle if "
              "you trust where it came from")


def looks_like_pickle(path: Path) -> bool:
    """A raw pickle (protocol 2-5 header) or a torch.save / TorchScript zip (it holds .pkl)."""
    with path.open("rb") as fh:
        head = fh.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                return any(n.endswith(".pkl") for n in z.namelist())
        except zipfile.BadZipFile:
            return False
    return False


def refuse_pickle(path: Path) -> ModelLoadError:
    return ModelLoadError(f"{path.name} is a pickle-based file (torch.save, TorchScript or "
                          f"pickle): loading it can run arbitrary code; {TRUST_HINT}")


def pt2_pickle_payloads(path: Path) -> list[str]:
    """Parts of a torch.export archive that torch.export.load would unpickle. torch 2.13 loads
    pickled weights and custom-object constants with the full unpickler, and retries sample
    inputs with weights_only=False when the safe load fails: any of those is listed here."""
    import torch

    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"{path.name} is not a readable torch.export program: {exc}") from None
    found = []
    with z:
        names = z.namelist()
        configs = [n for n in names if n.endswith(("_weights_config.json", "_constants_config.json"))]
        if not any(n.endswith("_weights_config.json") for n in names):
            found.append("weights in the legacy pickled format")
        for cfg in configs:
            entries = json.loads(z.read(cfg)).get("config", {})
            found += [f"pickled {k}" for k, meta in entries.items() if meta.get("use_pickle")]
        found += [n for n in names if "/data/constants/" in n and
                  n.rsplit("/", 1)[-1].startswith(("custom_obj_", "opaque_obj_"))]
        found[:0] = _subclass_payloads(z, names, configs)  # named first: the reason
        for sample in (n for n in names if "/data/sample_inputs/" in n):
            try:
                torch.load(io.BytesIO(z.read(sample)), weights_only=True)
            except Exception:
                found.append(f"{sample} needs the full unpickler")
    return found


# packages whose tensor subclasses torch.export.save pickles (quantized weights)
SUBCLASS_PACKAGES = ("torchao",)


def _subclass_payloads(z: zipfile.ZipFile, names: list[str], configs: list[str]) -> list[str]:
    """Pickled weights that are a quantization package's tensor subclasses (named by the
    package's module path inside the pickle), said as such."""
    pickled = []
    for cfg in configs:
        entries = json.loads(z.read(cfg)).get("config", {})
        folder = cfg.rsplit("/", 1)[0]
        pickled += [(k, f"{folder}/{meta.get('path_name', '')}") for k, meta in entries.items()
                    if meta.get("use_pickle")]
    found = []
    for package in SUBCLASS_PACKAGES:
        tag = package.encode()
        hits = [k for k, member in pickled if member in names and tag in z.read(member)]
        if hits:
            found.append(f"{package} tensor subclasses ({len(hits)} weights)")
    return found


def pickle_advice(payloads: list[str]) -> str:
    """What to do about a .pt2's pickle payloads: a quantization package's tensor subclasses
    are pickled by torch.export.save itself, so re-exporting does not help; trusting it does."""
    packages = [p for p in SUBCLASS_PACKAGES if any(x.startswith(p + " ") for x in payloads)]
    if not packages:
        return TRUST_HINT
    names = ", ".join(packages)
    return (f"{names}'s quantized weights are tensor subclasses, which torch.export.save "
            f"pickles: pass --trust-pickle if you trust where it came from (loading them needs "
            f"{names} installed)")


def check_external_data(model: Any, base_dir: Path) -> None:
    """Every external-data reference must name an existing file inside the model's folder."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    base = base_dir.resolve()
    for tensor in _all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        target = (base / location).resolve()
        if Path(location).is_absolute() or base not in target.parents:
            raise ModelLoadError(f"tensor {tensor.name!r} points its external data outside the "
                                 f"model's folder ({location!r}); refused")
        if not target.is_file():
            raise ModelLoadError(f"tensor {tensor.name!r}: external data file {location!r} "
                                 "is missing")


def _all_tensors(model: Any) -> list[Any]:
    from onnx.external_data_helper import _get_all_tensors

    return list(_get_all_tensors(model))
