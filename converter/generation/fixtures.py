"""Tiny random-weight decoder-only models saved as Hugging Face folders, for tests, benchmarks
and the README: no hub download. "Trained-like": embeddings and the LM head drawn with a larger
spread, so logits are far from uniform and greedy decoding is not a coin toss."""
from __future__ import annotations

from pathlib import Path


def tiny_folder(kind: str, path: Path, *, seed: int = 0, vocab: int = 300) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab,
                                           n_positions=128, bos_token_id=0, eos_token_id=0,
                                           tie_word_embeddings=False))
    elif kind in LLAMA_LIKE:
        config_cls, model_cls = LLAMA_LIKE[kind]()
        model = model_cls(config_cls(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=vocab, max_position_embeddings=128,
            bos_token_id=0, eos_token_id=0, tie_word_embeddings=False))
    else:
        raise ValueError(f"no tiny fixture {kind!r}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("wte", "embed_tokens", "lm_head")):
                p.normal_(0.0, 1.0)
    model.eval().save_pretrained(str(path))
    return path


def _llama() -> tuple:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaConfig, LlamaForCausalLM


def _qwen2() -> tuple:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2Config, Qwen2ForCausalLM


def _mistral() -> tuple:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralConfig, MistralForCausalLM


LLAMA_LIKE = {"llama": _llama, "qwen2": _qwen2, "mistral": _mistral}
