"""The validation feeds: the user's .npz, a torch source's example inputs, or generated ones."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtconvert.errors import InputGenerationError, UsageError
from mtconvert.shapes import resolve_shapes
from mtconvert.validators.inputs import InputError, InputRequest, check_user_feeds, generate, guess_role

if TYPE_CHECKING:
    from mtconvert.options import ConvertOptions
    from mtconvert.source import LoadedSource

Feeds = dict[str, np.ndarray]


def prepare(loaded: LoadedSource, opts: ConvertOptions) -> tuple[Feeds, dict[str, str]]:
    """Feeds for every source input, and a one-line description of how each was made."""
    src = loaded.prepared
    try:
        if opts.inputs is not None:
            feeds, origin = _user_feeds(opts.inputs), "user inputs"
            if isinstance(opts.inputs, (str, Path)):
                origin = f"from {Path(opts.inputs).name}"
            return _fit_user(src.inputs, feeds), {k: origin for k in feeds}
        if loaded.example_feeds is not None:
            return _examples(loaded, opts)
        return _generated(loaded, opts)
    except InputError as exc:
        raise InputGenerationError(str(exc)) from None


def _examples(loaded: LoadedSource, opts: ConvertOptions) -> tuple[Feeds, dict[str, str]]:
    feeds = loaded.example_feeds or {}
    for name, shape in opts.input_shapes.items():
        if name in feeds and tuple(feeds[name].shape) != shape:
            raise UsageError(f"--input-shape {name}: a PyTorch source is validated at its "
                             f"example inputs' shape {tuple(feeds[name].shape)}")
    names = {s.name for s in loaded.prepared.inputs}
    return ({k: v for k, v in feeds.items() if k in names},
            {k: "example_inputs" for k in feeds if k in names})


def _requests(loaded: LoadedSource, opts: ConvertOptions) -> tuple[list[InputRequest], list[str]]:
    src = loaded.prepared
    shapes, notes = resolve_shapes(src.inputs, dict(opts.input_shapes), loaded.weight_dims)
    return [InputRequest(s.name, shapes[s.name], s.dtype, guess_role(s.name, s.dtype),
                         loaded.int_highs.get(s.name)) for s in src.inputs], notes


def _generated(loaded: LoadedSource, opts: ConvertOptions) -> tuple[Feeds, dict[str, str]]:
    requests, notes = _requests(loaded, opts)
    feeds = generate(requests, seed=opts.seed)
    values = {r.name: f"{r.describe()} (seed {opts.seed})" for r in requests}
    for note in notes:
        name = note.split(" ", 1)[0]
        values[name] += f"; {note.split(' ', 1)[1]}"
    return feeds, values


def user_feeds(inputs: Any) -> Feeds:
    """The user's inputs (.npz path or dict) as arrays; a one-line InputGenerationError if not."""
    try:
        return _user_feeds(inputs)
    except InputError as exc:
        raise InputGenerationError(str(exc)) from None


def _user_feeds(inputs: Any) -> Feeds:
    if isinstance(inputs, dict):
        return {str(k): np.asarray(v) for k, v in inputs.items()}
    path = Path(inputs)
    if not path.is_file():
        raise InputError(f"inputs file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise InputError(f"{path.name} holds one array; use an .npz keyed by input name")
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path.name} is not a readable .npz file: {exc}") from None


def _fit_user(specs: tuple, feeds: Feeds) -> Feeds:
    expected = {s.name: (s.dtype, tuple(d if isinstance(d, int) else None for d in s.shape))
                for s in specs}
    check_user_feeds(feeds, expected)
    return {s.name: feeds[s.name].astype(s.dtype, copy=False) for s in specs}


CALIBRATION_SAMPLES = 8


def calibration_set(loaded: LoadedSource, opts: ConvertOptions, feeds: Feeds,
                    path: Path) -> tuple[Path, str]:
    """Write calibration samples for int8 as one .npz of arrays (samples, *input shape).

    From ``opts.calibration`` when given (each array the input's shape, or samples stacked on a
    new first axis); else CALIBRATION_SAMPLES generated sets (seeds after --seed); else, for
    user or example inputs, those inputs. Returns the path and a description for the report.
    """
    shapes = {k: v.shape for k, v in feeds.items()}
    try:
        if opts.calibration is not None:
            data = _user_feeds(opts.calibration)
            stacked = {k: _stack(k, data.get(k), shape) for k, shape in shapes.items()}
            how = f"{opts.calibration.name}: {len(next(iter(stacked.values())))} samples"
        elif opts.inputs is None and loaded.example_feeds is None:
            requests, _ = _requests(loaded, opts)
            sets = [generate(requests, seed=opts.seed + 1 + i) for i in range(CALIBRATION_SAMPLES)]
            stacked = {k: np.stack([s[k] for s in sets]) for k in shapes}
            how = f"{CALIBRATION_SAMPLES} generated samples (seeds {opts.seed + 1}..)"
        else:
            stacked = {k: v[None] for k, v in feeds.items()}
            how = "the validation inputs (1 sample)"
    except InputError as exc:
        raise InputGenerationError(f"calibration data: {exc}") from None
    np.savez(path, **stacked)
    return path, how


def _stack(name: str, arr: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if arr is None:
        raise InputError(f"no array for input {name!r}")
    if tuple(arr.shape) == tuple(shape):
        return arr[None]
    if tuple(arr.shape[1:]) == tuple(shape):
        return arr
    raise InputError(f"input {name!r}: shape {tuple(arr.shape)} is neither {tuple(shape)} nor "
                     f"(samples, {', '.join(map(str, shape))})")
