"""mergebuild tests; a package so `from tests.families import ...` works under plain `pytest`."""
