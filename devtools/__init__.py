"""Tools for developing kmsd (the tests and bench/ use them); not part of
the kmsd wheel (pyproject.toml's packages.find takes kmsd* and kmsd_client*
only)."""
