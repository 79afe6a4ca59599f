"""Warm pool claims against cold starts: `bench_operator --warm` with its defaults, so that `python -m bench`
runs it too (50 sessions at 10/s and at 50/s, each series warm then cold). JSON on stdout.

    python -m bench.bench_pool [--sessions 50 --warm-rates 10 50]
"""

import asyncio
import sys

from bench.bench_operator import main

if __name__ == "__main__":
    sys.exit(asyncio.run(main(["--warm", "--sessions", "50", *sys.argv[1:]])))
