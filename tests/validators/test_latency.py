import pytest

from mtconvert.validators.latency import measure, summarize


def test_summarize_percentiles():
    s = summarize([float(i) for i in range(1, 101)], warmup=2)
    assert s.p50_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(90.1)
    assert s.mean_ms == pytest.approx(50.5)
    assert (s.iterations, s.warmup) == (100, 2)


def test_measure_calls_warmup_plus_iterations():
    calls = []
    stats = measure(lambda: calls.append(1), warmup=3, iterations=5)
    assert len(calls) == 8 and stats.iterations == 5 and stats.p50_ms >= 0


def test_measure_rejects_nonsense():
    with pytest.raises(ValueError):
        measure(lambda: None, warmup=0, iterations=0)
    with pytest.raises(ValueError):
        summarize([], warmup=0)
