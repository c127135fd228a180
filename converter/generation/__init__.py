"""Generative models with a KV cache: a Hugging Face folder's decode-step graph to every target,
validated by what it generates (folder source, step module, host loop, judgement, the run)."""
