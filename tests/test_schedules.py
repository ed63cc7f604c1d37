import math

import numpy as np
import pytest

import patchmosaic as pm
from patchmosaic.schedules import get_schedule


def test_cosine_legacy_matches_the_paper():
    s = pm.schedules.cosine_legacy
    assert s.alpha_bar(0.0) == pytest.approx(1.0, abs=1e-15)
    assert s.alpha_bar(1.0) == pytest.approx(math.cos(math.pi / 2 / 1.008) ** 2, rel=1e-12)
    assert 1.5e-4 < s.alpha_bar(1.0) < 1.6e-4
    t = np.linspace(0.01, 1, 50)
    assert np.allclose(s.one_minus_alpha_bar(t), 1 - s.alpha_bar(t), atol=1e-14)


@pytest.mark.parametrize("name", ["cosine_legacy", "cosine", "linear"])
def test_schedules_are_monotone_and_accurate_at_small_t(name):
    s = get_schedule(name)
    t = np.linspace(1e-6, 1, 1000)
    ab = s.alpha_bar(t)
    assert np.all(np.diff(ab) < 0) and np.all(ab <= 1) and np.all(ab >= 0)
    # 1 - alpha_bar is computed without cancellation: it keeps its small-t power law
    tiny = np.array([1e-7, 1e-5])
    b2 = s.one_minus_alpha_bar(tiny)
    assert np.all(b2 > 0)
    ratio = b2[1] / b2[0]
    # b2 ~ c t^2 for cosine_legacy (its angle starts at 0), ~ c t for the offset cosine and linear
    assert ratio == pytest.approx(1e4 if name == "cosine_legacy" else 100.0, rel=1e-3)


def test_cosine_reaches_zero_and_starts_at_one():
    s = pm.schedules.cosine
    assert s.alpha_bar(0.0) == pytest.approx(1.0, abs=1e-15)
    assert s.alpha_bar(1.0) == pytest.approx(0.0, abs=1e-15)


def test_callable_schedule():
    s = get_schedule(lambda t: 1 - t)
    a, b2 = s.coefficients(np.array([0.25]))
    assert a[0] == pytest.approx(math.sqrt(0.75)) and b2[0] == pytest.approx(0.25)
