"""Helpers shared by the test modules. Imported as ``support`` (``from
support.ids import uid``), like ``conftest``: tests/ has no __init__.py, so
pytest puts tests/ itself on sys.path (its default "prepend" import mode)."""
