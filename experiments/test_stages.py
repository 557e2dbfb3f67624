"""The stage tests of the package (fq_pytest/stages/test_stages.py), collected here so that
`make gate` and `make test` in the checkout keep their ids (experiments/test_stages.py::…)."""

from fq_pytest.stages.test_stages import *  # noqa: F403
