"""hack/postgres.sh: a busy port is one clear line; a DIR left by a killed run is cleaned and restarted."""

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg

SCRIPT = Path(__file__).resolve().parents[2] / "hack" / "postgres.sh"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=180)


def test_a_port_in_use_gives_one_line_and_leaves_nothing(postgres_server):
    directory = Path(tempfile.gettempdir()) / f"agentbox-pg-script-{os.getpid()}"
    result = run("up", str(directory), str(postgres_server.port))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"postgres.sh: port {postgres_server.port} on 127.0.0.1 is already in use"]
    assert not directory.exists()


async def test_a_dir_left_by_a_killed_server_is_cleaned_and_restarted(postgres_server):
    directory = Path(tempfile.mkdtemp(prefix="agentbox-pg-script-"))
    try:
        first = run("up", str(directory))
        assert first.returncode == 0, first.stderr
        postmaster = int((directory / "data" / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)  # leaves postmaster.pid and shared memory behind
        time.sleep(0.5)
        second = run("up", str(directory))
        assert second.returncode == 0, second.stderr
        dsn = second.stdout.strip().splitlines()[-1]
        assert dsn == run("url", str(directory)).stdout.strip()
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
            assert await conn.fetchval("SHOW fsync") == "off"
        finally:
            await conn.close()
    finally:
        assert run("down", str(directory)).returncode == 0
    assert not directory.exists()
