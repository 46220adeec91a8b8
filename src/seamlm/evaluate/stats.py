"""Standard errors of the evaluation's means (lm-eval's rule) and the paired difference of two models' scores."""

from __future__ import annotations

import math

from seamlm.errors import ConfigError


def mean_stderr(values: list[float]) -> float:
    """Standard error of the mean of ``values``: sample standard deviation (n − 1) over √n, as lm-eval's
    ``mean_stderr`` (for 0/1 outcomes, its accuracy stderr); NaN below two values."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of ``b[i] − a[i]`` over paired items (two models' scores on the same prompts) and its standard error:
    pairing removes the prompts' own spread, which two separate standard errors would count twice."""
    if len(a) != len(b) or not a:
        raise ConfigError(f"paired difference: {len(a)} and {len(b)} items; pair the same, non-empty items")
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    return sum(diffs) / len(diffs), mean_stderr(diffs)
