"""Fixtures shared by every test live in tests/fixtures/ (one module per real dependency)."""

pytest_plugins = [
    "fixtures.cluster",
    "fixtures.database",
]
