"""A throwaway PostgreSQL 15 for a benchmark run (hack/postgres.sh), removed when the run ends."""

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCRIPT = str(Path(__file__).resolve().parents[1] / "hack" / "postgres.sh")


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Yield the superuser DSN of a fresh server on a free loopback port."""
    directory = Path(tempfile.mkdtemp(prefix="agentbox-bench-pg-"))
    try:
        started = subprocess.run([SCRIPT, "up", str(directory)], capture_output=True, text=True, check=True,
                                 timeout=600)
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([SCRIPT, "down", str(directory)], capture_output=True, timeout=120, check=False)
