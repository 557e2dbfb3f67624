"""pytest-html hooks: the go/no-go summary and per-test evidence (being written)."""
