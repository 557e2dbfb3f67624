"""The sensitivity sweep: one test per model × tensor kind × layer × format × variant.

Each cell fake-quantizes one layer's tensors of one kind (or the first n layers, for the
cumulative curve "more layers, more error"), evaluates once against the cached baseline and
compares with its selection-matched placebos (fq_core.experiment.sweep.run.run_cell; cached
per cell, so a wider or resumed sweep runs only new cells). The test asserts that the cell was
measured; whether its effect stands above the engine's noise is a statistical statement over
all cells (Benjamini–Hochberg), made by the sensitivity report (reports/sensitivity.html), not
by one test.

Plain `pytest` runs the smoke plan (Gemma3, ffn_norm, layers 0-1, BF16, deployed, 2 chunks);
`make sweep` = `pytest -m sweep --fq-sweep-plan full`. Ids name every axis:
`pytest -m sweep --fq-sweep-plan full -k "gemma3-270m and ffn_norm and bf16 and deployed"`.
"""

from __future__ import annotations

import pytest

from fq_core.storage.cell_record import NOT_DEPLOYABLE, CellRecord

pytestmark = [pytest.mark.sweep, pytest.mark.llama, pytest.mark.models]


def test_sensitivity(fq_sweep_cell: CellRecord):
    """The cell was measured: fake quantization, one llama.cpp run, its placebos."""
    rec = fq_sweep_cell
    if rec.status == NOT_DEPLOYABLE:  # the real file's answer, in llama.cpp's words
        assert rec.error and "unsupported" in rec.error, rec.error
        return
    assert rec.status == "measured", f"{rec.cell.id}: {rec.error}"
    assert rec.treatment is not None and rec.numeric is not None
    if not rec.treatment.identical:
        assert rec.treatment.chunk_klds, "no per-chunk KLD: the cell cannot be tested"
        assert len(rec.placebo) == len(rec.identity.settings["placebo_seeds"])
