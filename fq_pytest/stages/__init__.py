"""The stage tests (Test 1-4 × model), shipped in the package so that an installed fq-suite
runs them from any repository: `pytest --pyargs fq_pytest.stages -k layer0 --fq-model PATH`."""
