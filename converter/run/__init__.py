"""The run modes and the one skeleton they share.

    source ──► feeds (once per shape) ──► reference ──► targets (convert? → check) ──► Report

``skeleton.Run`` holds what a run shares: the options, the source, feeds and reference outputs
per input shape, the clock; it assembles the Report. ``convert``, ``validate`` and ``verify``
are thin callers of it (a matrix cell calls ``convert.run``). ``target`` converts one target
through its routes; ``check`` lints, runs and judges one artifact.
"""
