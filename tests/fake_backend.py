"""A fake backend for pipeline, CLI and report tests only: its "artifact" is a copy of the
source ONNX, run by ONNX Runtime. Knobs in TargetOptions.extra[<backend name>] make it misbehave
on purpose: noise (add this much to every output), crash (segfault in the runtime), kill
(SIGKILL, as the out-of-memory killer does), hang (sleep forever in the runtime),
convert_error (raise ConversionError), lint_error (an error finding), batch_noise (add 1.0 to
the outputs of batches larger than 1: a shape-dependent bug), noise_if_op (add 0.5 to the
outputs when the model contains that op type: a broken op, for localization), inf_if_op (the
same with +inf). TracedFakeBackend ("fake-traced") also hands out intermediate tensors: every
node's output by ONNX Runtime, with noise_if_op/inf_if_op applied from that op on.)"""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np

from mtconvert.backends.base import (Artifact, Backend, Finding, PreparedSource, Session,
                                     TargetOptions)
from mtconvert.errors import ConversionError


class FakeBackend(Backend):
    name = "fake"
    aliases = ("phony",)
    description = "test double"
    precisions = ("fp32", "fp16")
    convert_requires = {"onnxruntime": "onnxruntime"}
    run_requires = {"onnxruntime": "onnxruntime"}

    def convert(self, source: PreparedSource, out_dir: Path, opts: TargetOptions) -> Artifact:
        log = out_dir / f"{source.name}.{self.name}.log"
        log.write_text("fake conversion\n")
        knobs = dict(opts.extra.get(self.name, {}))
        if knobs.get("convert_error"):
            (out_dir / f"{source.name}.fake").write_bytes(b"half-written")
            raise ConversionError("the fake tool failed", target=self.name, step="convert",
                                  log_path=log)
        art = out_dir / f"{source.name}.fake"
        shutil.copyfile(source.onnx_path, art)
        return Artifact(target=self.name, primary=art, files=(art,), precision=opts.precision,
                        steps=("copy source",), log_path=log,
                        meta=knobs)

    def lint(self, artifact: Artifact) -> list[Finding]:
        if artifact.meta.get("lint_error"):
            return [Finding("error", "fake-op", "op FakeOp is not supported on phones")]
        return [Finding("info", "fake-info", "all good")]

    def open(self, artifact: Artifact, threads: int) -> Session:
        return FakeSession(artifact, threads)


class FakeSession(Session):
    runtime = "fake-ort"

    def __init__(self, artifact: Artifact, threads: int):
        import onnxruntime as ort

        if artifact.meta.get("crash"):
            os.kill(os.getpid(), signal.SIGSEGV)
        if artifact.meta.get("kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        if artifact.meta.get("hang"):
            import time

            time.sleep(3600)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self._sess = ort.InferenceSession(str(artifact.primary), so,
                                          providers=["CPUExecutionProvider"])
        self._path = artifact.primary
        self._noise = float(artifact.meta.get("noise", 0.0))
        self._delay_ms = float(artifact.meta.get("delay_ms", 0.0))
        self._skew = float(artifact.meta.get("skew", 0.0))
        self._batch_noise = bool(artifact.meta.get("batch_noise"))
        self._broken = {op: extra for key, extra in (("noise_if_op", 0.5), ("inf_if_op", np.inf))
                        if (op := artifact.meta.get(key))}
        if self._broken:
            import onnx

            ops = {n.op_type for n in onnx.load(str(artifact.primary)).graph.node}
            self._noise += sum(extra for op, extra in self._broken.items() if op in ops)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self._sess.get_outputs()]
        outs = self._sess.run(names, feeds)
        if self._delay_ms:  # a slower target: the busy wait a slower kernel would be
            end = time.perf_counter() + self._delay_ms / 1000
            while time.perf_counter() < end:
                pass
        noise = self._noise + (1.0 if self._batch_noise and outs[0].shape[0] > 1 else 0.0)
        outs = [o + np.asarray(noise, dtype=o.dtype) for o in outs]
        if self._skew:  # the first class's score raised: predictions change
            outs = [o + np.eye(o.shape[-1], dtype=o.dtype)[0] * self._skew for o in outs]
        return dict(zip(names, outs))


    def intermediates(self, feeds: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
        from mtconvert import trace

        found, extra = trace.source_tensors(self._path, feeds), {}
        for i, t in enumerate(found):
            extra[i] = max([self._broken.get(t.op_type, 0.0)] +
                           [extra[p] for p in t.parents])
        return [(f"fake/{t.name}", t.op_type, t.value + np.float32(extra[i]))
                for i, t in enumerate(found)]


class TracedFakeBackend(FakeBackend):
    name = "fake-traced"
    aliases = ()
    addressable_intermediates = True


class OtherFakeBackend(FakeBackend):
    name = "fake2"
    aliases = ()


class FixedShapeFakeBackend(FakeBackend):
    name = "fake-fixed"
    aliases = ()
    fixed_shapes = True
