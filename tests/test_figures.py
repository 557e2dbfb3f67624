"""How measured figures print: a value that rounds to zero never shows a sign."""

import math

import numpy as np
import pytest

from fq_core.figures import figure, sci

CASES = [
    # value, spec, text
    (-1e-9, "+.2f", "0.00"),
    (1e-9, "+.2f", "0.00"),
    (-0.0, "+.2f", "0.00"),
    (-0.0, ".2f", "0.00"),
    (0.0, "+.4f", "0.0000"),
    (0.004, "+.2f", "0.00"),
    (0.006, "+.2f", "+0.01"),
    (-0.006, "+.2f", "-0.01"),
    (-0.5, "+.2f", "-0.50"),
    (0.83, "+.2f", "+0.83"),
    (-1e-9, "+.2e", "-1.00e-09"),  # scientific keeps the digits, so the sign means something
    (0, "+d", "0"),
    (-3, "+d", "-3"),
    (np.float32(-1e-9), "+.2f", "0.00"),
    (np.float64(-1e-9), "+.2f", "0.00"),
    (math.inf, "+.2f", "+inf"),
    (-math.inf, ".2f", "-inf"),
    (12345.678, ",.1f", "12,345.7"),
]


@pytest.mark.parametrize("value,spec,text", CASES)
def test_figure(value, spec, text):
    assert figure(value, spec) == text


def test_nan_is_left_to_format():
    assert "nan" in figure(math.nan, "+.2f")


@pytest.mark.parametrize(
    "x, text",
    [(None, "—"), (2.6e-5, "2.6e-05"), (0.006, "0.0060"), (0.0, "0.0000"), (1.9e-7, "1.9e-07")],
)
def test_sci(x, text):
    assert sci(x) == text
