"""Per-operator profiling, one module per runtime, for ``Session.profile`` (``--profile``):
each runs the session's model under its runtime's own profiler and returns OpTimes."""
