"""The sensitivity sweep: which layers, tensor kinds and formats matter, one cell at a time.

A *cell* is one model × tensor kind × selection × format × variant: the selected tensors
fake-quantized (one layer alone, or the first n layers for the cumulative curve), one
llama.cpp evaluation against the cached baseline, and the selection-matched placebos.
Three jobs, one module each: `plan` (which cells), `run` (measuring one cell, cached, with
its p-value) and `analysis` (the cells of one or more results directories merged, then
Benjamini–Hochberg, rank ranges and the sentence). A cell's record (`CellRecord`) is a
record like the stage's: fq_core.storage.cell_record. No pytest here.
"""
