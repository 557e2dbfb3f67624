"""pytest wiring for fq-suite: options, fixtures, the gate and report hooks.

The library (fq_core) never imports pytest; everything pytest-shaped lives here.
"""
