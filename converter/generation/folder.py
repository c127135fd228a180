"""A local Hugging Face model folder as a source: ``config.json`` plus ``model.safetensors``
(or sharded safetensors; a pickled ``pytorch_model.bin`` only with --trust-pickle). Never a hub
download: the folder is read with ``local_files_only``. Every problem is one line, exit 2."""
from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtconvert.errors import ModelLoadError, UsageError

# architectures suffix -> the task it does
TASKS_BY_SUFFIX = (("WhisperForConditionalGeneration", "automatic-speech-recognition"),
                   ("SpeechSeq2Seq", "automatic-speech-recognition"),
                   ("MTModel", "text2text-generation"),  # MarianMTModel
                   ("ForCausalLM", "text-generation"), ("LMHeadModel", "text-generation"),
                   ("ForConditionalGeneration", "text2text-generation"),
                   ("ForMaskedLM", "fill-mask"), ("ForSequenceClassification",
                                                   "text-classification"),
                   ("ForTokenClassification", "token-classification"), ("Model", "text-encoding"))
SUPPORTED_TASKS = ("text-generation", "text2text-generation", "automatic-speech-recognition")
SEQ2SEQ_TASKS = ("text2text-generation", "automatic-speech-recognition")
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class HFFolder:
    """A Hugging Face model: a folder on disk, or (``path`` None) a PreTrainedModel in memory."""

    path: Path | None
    config: dict[str, Any]
    task: str
    weights: tuple[Path, ...]
    sha256: str | None  # of config.json and the weight files, in order (None: in memory)
    model: Any = None  # the in-memory PreTrainedModel

    @property
    def label(self) -> str:
        return self.path.name if self.path else type(self.model).__name__

    @property
    def tokenizer_file(self) -> Path | None:
        f = self.path / "tokenizer.json" if self.path else None
        return f if f is not None and f.is_file() else None


def is_hf_folder(model: Any) -> bool:
    """A directory given as the model: the generation path reads it (and explains what is
    missing when it is not a Hugging Face folder)."""
    return isinstance(model, (str, Path)) and Path(model).is_dir()


def is_generative_source(model: Any, example_inputs: Any, task: str | None) -> bool:
    """A model folder; or a transformers PreTrainedModel given without example inputs (with
    them, it is an ordinary module converted for one forward pass) that generates text, or
    was asked to (``--task``)."""
    import sys

    if is_hf_folder(model):
        return True
    tf = sys.modules.get("transformers")
    if example_inputs is not None or tf is None or not isinstance(model, tf.PreTrainedModel):
        return False
    return task is not None or _task_of([type(model).__name__]) in SUPPORTED_TASKS


def from_model(model: Any, task: str | None) -> HFFolder:
    """An in-memory PreTrainedModel as a source: its config, the task from its class."""
    inferred = _task_of([type(model).__name__])
    task = task or inferred
    if task not in SUPPORTED_TASKS:
        raise UsageError(f"--task {task}: not supported for Hugging Face models yet (supported: "
                         f"{', '.join(SUPPORTED_TASKS)})")
    if inferred != task:
        raise UsageError(f"{type(model).__name__} cannot do --task {task}")
    return HFFolder(None, model.config.to_dict(), task, (), None, model)


def open_folder(path: Path, task: str | None, trust_pickle: bool) -> HFFolder:
    path = Path(path).resolve()
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} is a directory without config.json; expected a .onnx or "
                             ".pt2 file, or a Hugging Face model folder")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{cfg_file} is not readable JSON: {exc}") from None
    weights = _weights(path, trust_pickle)
    archs = config.get("architectures") or []
    inferred = _task_of(archs)
    if task is None:
        if inferred is None:
            raise UsageError(f"{path.name}: cannot infer the task from architectures "
                             f"{archs or '(none)'}; give --task")
        task = inferred
    if task not in SUPPORTED_TASKS:
        raise UsageError(f"--task {task}: not supported for model folders yet (supported: "
                         f"{', '.join(SUPPORTED_TASKS)})")
    if inferred != task:
        raise UsageError(f"{path.name} ({', '.join(archs) or 'no architectures'}) cannot do "
                         f"--task {task}")
    return HFFolder(path, config, task, weights, _digest([cfg_file, *weights]))


def _task_of(archs: list[str]) -> str | None:
    for arch in archs:
        for suffix, task in TASKS_BY_SUFFIX:
            if arch.endswith(suffix):
                return task
    return None


def _weights(path: Path, trust_pickle: bool) -> tuple[Path, ...]:
    for name in SAFE_WEIGHTS:
        if (path / name).is_file():
            return _with_shards(path, name)
    for name in PICKLED_WEIGHTS:
        if (path / name).is_file():
            if not trust_pickle:
                raise ModelLoadError(f"{path.name}/{name} is a pickle: loading it can run "
                                     "arbitrary code; convert it to model.safetensors, or pass "
                                     "--trust-pickle if you trust its origin")
            return _with_shards(path, name)
    raise ModelLoadError(f"{path} has no weights (model.safetensors, or pytorch_model.bin with "
                         "--trust-pickle) and no ONNX graphs as Optimum exports them "
                         "(model.onnx, decoder_with_past_model.onnx, decoder_model_merged.onnx)")


def _with_shards(path: Path, name: str) -> tuple[Path, ...]:
    if not name.endswith(".index.json"):
        return (path / name,)
    try:
        index = json.loads((path / name).read_text())
        shards = sorted(set(index["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise ModelLoadError(f"{path.name}/{name} is not a weight index: {exc}") from None
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise ModelLoadError(f"{path.name}: weight shard(s) missing: {', '.join(missing[:3])}")
    return (path / name, *(path / s for s in shards))


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def is_seq2seq(folder: HFFolder) -> bool:
    return folder.task in SEQ2SEQ_TASKS


def check_architecture(folder: HFFolder) -> None:
    """The model type has a decode-step builder for its task (mtconvert.generation.step;
    encoder-decoder: mtconvert.generation.seq2seq)."""
    from mtconvert.generation import seq2seq, step

    kind = folder.config.get("model_type")
    supported = {"text-generation": step.SUPPORTED, "text2text-generation": seq2seq.TEXT2TEXT,
                 "automatic-speech-recognition": seq2seq.SPEECH}[folder.task]
    if kind not in supported:
        raise UsageError(f"{folder.label}: architecture {kind!r} "
                         f"({', '.join(folder.config.get('architectures') or [])}) is not "
                         f"supported for {folder.task} yet (supported: {', '.join(supported)})")


def load_model(folder: HFFolder) -> Any:
    """The model in eval mode, fp32, eager attention, from the folder only (an in-memory
    model: itself, or a float32 copy of it)."""
    check_architecture(folder)
    if folder.model is not None:
        import copy

        import torch

        model = folder.model
        if any(p.dtype != torch.float32 for p in model.parameters()):
            model = copy.deepcopy(model).float()
        return model.eval()
    try:
        import torch
        import transformers
    except ImportError:
        raise ModelLoadError("reading a model folder needs torch and transformers: pip install "
                             "'mtconvert[generation]'") from None
    try:
        with quiet_transformers():
            auto = {"text2text-generation": transformers.AutoModelForSeq2SeqLM,
                    "automatic-speech-recognition": transformers.AutoModelForSpeechSeq2Seq}.get(
                folder.task, transformers.AutoModelForCausalLM)
            model = auto.from_pretrained(
                str(folder.path), local_files_only=True, dtype=torch.float32,
                attn_implementation="eager",
                use_safetensors=folder.weights[0].name.startswith("model.safetensors"))
    except Exception as exc:  # noqa: BLE001 - any failure to read is the user's input
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]
        raise ModelLoadError(f"{folder.label}: cannot load the model: {text}") from None
    return model.eval()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars, advice and deprecation warnings off while it loads and runs
    the model (the report says what matters), its settings restored after."""
    import warnings

    from transformers.utils import logging as tf_logging

    level, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()
