"""What every bad-input CLI test checks: exit 2, one line on stderr naming the problem, and
nothing written to the output folder."""


def assert_usage_error(proc, needle, out):  # noqa: ANN001, ANN201 - a test helper
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtconvert: error:") and needle in lines[0], \
        lines
    assert not out.exists()
