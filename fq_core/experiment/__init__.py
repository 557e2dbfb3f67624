"""Experiment: what a stage or a sweep cell measures and concludes (protocol, stages, checks,
the gate, regressions, the sweep and its statistics)."""
