"""Validation maths: input generation, numeric comparison, tolerances, latency statistics.

Pure numpy; imports nothing from mtconvert's converter or backends.
"""
