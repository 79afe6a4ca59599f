"""End-to-end tests. hack/ holds the dev tooling these tests share with `make dev`: importable from here."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack"))
