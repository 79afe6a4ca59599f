"""Runner latency with the scripted agent: POST /message until the first message_update event (the
echoed user message) and until the first agent message_update. JSON on stdout.

    python -m bench.bench_runner [--messages 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.bench_gateway import percentile, summary
from tests.sandbox.conftest import runner_process, sse_events


async def measure(base: str, headers: dict[str, str], messages: int) -> tuple[list[float], list[float]]:
    first_update, first_agent_update = [], []
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as http, \
            http.stream("GET", "/events") as stream:
        events = sse_events(stream)
        async for kind, _ in events:  # the snapshot ends with the current status
            if kind == "status_change":
                break
        for index in range(messages):
            started = time.perf_counter()
            posted = asyncio.create_task(http.post("/message", json={"content": f"ping {index}"}))
            seen_update = seen_agent = None
            async for kind, data in events:
                if kind == "message_update" and seen_update is None:
                    seen_update = time.perf_counter() - started
                if kind == "message_update" and data["role"] == "agent" and seen_agent is None:
                    seen_agent = time.perf_counter() - started
                if kind == "status_change" and data["status"] == "stable":
                    break
            (await posted).raise_for_status()
            first_update.append(seen_update)
            first_agent_update.append(seen_agent)
    return first_update, first_agent_update


async def run(messages: int) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        runner = runner_process(Path(directory), "http://127.0.0.1:9/mcp")  # the scripted echo needs no MCP
        runner.start()
        try:
            await measure(runner.base, runner.headers(), 5)  # warm-up
            first_update, first_agent = await measure(runner.base, runner.headers(), messages)
        finally:
            runner.proc.stop()
    return {
        "benchmark": "runner_message_to_first_update",
        "messages": messages,
        "first_message_update": summary(first_update),
        "first_agent_message_update": summary(first_agent),
        "target_p50_ms": 50,
        "meets_target": percentile(first_update, 0.5) <= 0.050 and percentile(first_agent, 0.5) <= 0.050,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=60)
    args = parser.parse_args()
    json.dump(asyncio.run(run(args.messages)), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
