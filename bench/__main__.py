"""Run every benchmark (or those named) and keep each one's JSON under bench/results/.

    python -m bench                  # all of them
    python -m bench gateway runner   # bench_gateway.py and bench_runner.py only
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all: {', '.join(available())})")
    args = parser.parse_args()
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(f"no such benchmark: {', '.join(unknown)} (have: {', '.join(available())})")

    RESULTS.mkdir(exist_ok=True)
    failed = []
    for name in names:
        started = time.monotonic()
        print(f"==> bench {name}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", f"bench.bench_{name}"], cwd=HERE.parent,
                              stdout=subprocess.PIPE, text=True, check=False)
        try:
            result = json.loads(proc.stdout)
        except json.JSONDecodeError:
            result = None
        if proc.returncode != 0 or result is None:
            failed.append(name)
            print(f"    failed (exit {proc.returncode}); stdout was:\n{proc.stdout[-2000:]}", file=sys.stderr)
            continue
        result.setdefault("wall_seconds", round(time.monotonic() - started, 1))
        out = RESULTS / f"{name}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(f"    wrote {out.relative_to(HERE.parent)}", file=sys.stderr)
    if failed:
        print(f"failed benchmarks: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
