"""The prompt and the reference: PyTorch eager on the original Hugging Face model (not on any
export of it). Greedy decoding by full forward passes (no cache, the plainest reference); the
last pass gives the teacher-forced logits of every position at once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mtconvert.errors import UsageError
from mtconvert.generation.folder import HFFolder

DEFAULT_PROMPT_IDS = (1, 2, 3, 4, 5, 6, 7, 8)


@dataclass(frozen=True)
class Reference:
    prompt: tuple[int, ...]
    tokens: tuple[int, ...]  # generated, the prompt not included
    logits: np.ndarray  # [len(prompt) + len(tokens) - 1, vocab]: position p predicts p + 1
    runtime: str
    version: str


def prompt_ids(folder: HFFolder, text: str | None, ids: tuple[int, ...] | None,
               vocab: int) -> tuple[tuple[int, ...], str]:
    """(the prompt's token ids, how they were chosen)."""
    if text is not None and ids:
        raise UsageError("give --prompt or --prompt-ids, not both")
    if ids:
        how = "--prompt-ids, as given"
    elif text is not None:
        ids, how = _tokenize(folder, text), f"--prompt {text!r}, tokenized by tokenizer.json"
    else:
        ids = tuple(i for i in DEFAULT_PROMPT_IDS if i < vocab)
        how = (f"default prompt (token ids {','.join(map(str, ids))}): neither --prompt nor "
               "--prompt-ids given")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise UsageError(f"prompt token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
    if not ids:
        raise UsageError("the prompt is empty")
    return tuple(int(i) for i in ids), how


def _tokenize(folder: HFFolder, text: str) -> tuple[int, ...]:
    if folder.tokenizer_file is None:
        raise UsageError(f"--prompt needs a tokenizer, and {folder.label} has no "
                         "tokenizer.json; give --prompt-ids")
    from tokenizers import Tokenizer

    try:
        return tuple(Tokenizer.from_file(str(folder.tokenizer_file)).encode(text).ids)
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer file is the user's input
        raise UsageError(f"{folder.tokenizer_file.name} could not tokenize the prompt: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else exc}") from None


def greedy(model: Any, prompt: tuple[int, ...], new_tokens: int) -> Reference:
    import torch

    seq = list(prompt)
    logits = None
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = model(torch.tensor([seq])).logits[0].float().numpy()
            seq.append(int(np.argmax(logits[-1])))
    return Reference(tuple(prompt), tuple(seq[len(prompt):]), logits, "pytorch-eager",
                     torch.__version__)


def step_module_error(module: Any, geometry: Any, ref: Reference) -> float:
    """Worst |logits| difference of the decode-step module itself (PyTorch eager, teacher
    forced) from the reference: what the rewrite costs before any target."""
    from mtconvert.generation.loop import decode

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = module(*(torch.from_numpy(v) for v in feeds.values()))
        return {k: v.numpy() for k, v in out.items()}

    got = decode(run, geometry, ref.prompt, len(ref.tokens), forced=ref.tokens)
    return float(np.max(np.abs(got.logits - ref.logits)))


def decoder_start(config: dict[str, Any], label: str) -> int:
    """The decoder's first token: the config's decoder_start_token_id (one line, exit 2,
    without one)."""
    start = config.get("decoder_start_token_id")
    if start is None:
        raise UsageError(f"{label}: config.json has no decoder_start_token_id; the decoder "
                         "cannot start")
    return int(start)


def greedy_seq2seq(model: Any, encoder_input: dict[str, Any], start: int,
                   new_tokens: int) -> Reference:
    """An encoder-decoder model's greedy decode from its decoder_start_token_id, by full
    forward passes (encoder and decoder each time, no cache): ``prompt`` is the decoder's
    (the start token), the encoder input is ``encoder_input`` (name -> numpy array)."""
    import torch

    feeds = {k: torch.from_numpy(v) for k, v in encoder_input.items()}
    seq, logits = [start], None
    with torch.inference_mode():
        for _ in range(new_tokens):
            out = model(**feeds, decoder_input_ids=torch.tensor([seq]))
            logits = out.logits[0].float().numpy()
            seq.append(int(np.argmax(logits[-1])))
    return Reference((start,), tuple(seq[1:]), logits, "pytorch-eager", torch.__version__)
