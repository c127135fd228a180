"""ExecuTorch target (PyTorch Mobile's successor): ``.pte`` programs lowered to XNNPACK."""
from mtconvert.backends.executorch.backend import ExecutorchBackend

__all__ = ["ExecutorchBackend"]
