"""Measured numbers as text: one place decides how a figure prints.

A difference that rounds to zero prints without a sign: "-0.00 %" and "+0.00 %" would
claim a direction the printed digits cannot show, and which one appears depends on the
CPU's kernels (issue 9), not on the model.
"""

from __future__ import annotations

import math


def figure(x: float | int, spec: str) -> str:
    """``format(x, spec)``, but a finite value that rounds to zero loses its sign."""
    text = format(x, spec)
    if text[:1] in "+-" and math.isfinite(float(x)):
        mantissa = text[1:].lower().split("e")[0]
        if not any(c in "123456789" for c in mantissa):
            return text[1:]
    return text


def sci(x: float | None, digits: int = 2) -> str:
    """A KLD-sized number people can read: 2.0e-05, 0.0060 ("—" when not measured)."""
    if x is None:
        return "—"
    if not math.isfinite(x):
        return figure(x, ".4f")
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return figure(x, ".4f")


def interval(iv) -> str:
    """An estimate with its interval, "2.0e-05 [1.1e-05, 3.2e-05]" (the estimate alone when
    the interval has no bounds; "—" when there is none). `iv`: estimate, low, high."""
    if iv is None:
        return "—"
    if iv.low is None or iv.high is None:
        return sci(iv.estimate)
    return f"{sci(iv.estimate)} [{sci(iv.low)}, {sci(iv.high)}]"
