import math

import pytest

from cai import labels


def test_option_probability_normalises_over_the_two_options():
    assert labels.option_probability(-1.0, -1.0) == pytest.approx(0.5)
    la, lb = math.log(0.3), math.log(0.1)  # other tokens hold the remaining 0.6
    assert labels.option_probability(la, lb) == pytest.approx(0.75)
    assert labels.option_probability(lb, la) == pytest.approx(0.25)
    # very different log-probs do not overflow
    assert labels.option_probability(0.0, -1000.0) == pytest.approx(1.0)
    assert labels.option_probability(-1000.0, 0.0) == pytest.approx(0.0)


def test_debias_cancels_a_constant_position_bias():
    # A judge that adds +0.2 to whichever option is first: true p(A) = 0.6
    assert labels.debias(0.6 + 0.2, (1 - 0.6) + 0.2) == pytest.approx(0.6)
    # swapping the responses gives exactly the complement
    p_ab, p_ba = 0.83, 0.41
    assert labels.debias(p_ab, p_ba) == pytest.approx(1 - labels.debias(p_ba, p_ab))


def test_clamp_and_ensemble():
    assert labels.clamp(0.99, 0.4, 0.6) == 0.6
    assert labels.clamp(0.01, 0.4, 0.6) == 0.4
    assert labels.clamp(0.5, 0.4, 0.6) == 0.5
    assert labels.ensemble([0.2, 0.4, 0.9]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        labels.ensemble([])
