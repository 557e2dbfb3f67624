"""Options, fixtures, the gate and stage ordering for the experiment (being written)."""
