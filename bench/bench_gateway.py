"""Gateway overhead: one MCP tool call through the gateway against the same call made directly to the
upstream, in the same run; and the gateway's RSS with five upstreams. JSON on stdout.

    python -m bench.bench_gateway [--calls 300]
    python -m bench.bench_gateway --callgrind [--calls 100]   # needs valgrind

With --callgrind it counts instead the instructions the gateway process runs per tool call (under
valgrind's callgrind, instrumentation on only while the calls run): far slower, but the same count
every time, where latency on a shared machine is not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from fastmcp import Client

from tests.sandbox.conftest import gateway_process, http_upstream, stdio_upstream_spec, wait_until

WARMUP = 20  # calls per round before timing starts
ROUNDS = 3


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(samples, 0.5) * 1000, 3),
            "p99_ms": round(percentile(samples, 0.99) * 1000, 3),
            "mean_ms": round(statistics.fmean(samples) * 1000, 3)}


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def timed_calls(url: str, tool: str, calls: int, warmup: int = WARMUP) -> list[float]:
    async with Client(url) as client:
        for index in range(warmup):
            await client.call_tool(tool, {"text": f"w{index}"})
        samples = []
        for index in range(calls):
            started = time.perf_counter()
            await client.call_tool(tool, {"text": str(index)})
            samples.append(time.perf_counter() - started)
    return samples


async def run(calls: int) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        upstreams = [http_upstream(tmp, "streamable-http", f"http{index}") for index in range(3)]
        upstreams.append(http_upstream(tmp, "sse", "sse0"))
        started = []
        try:
            for upstream in upstreams:
                started.append(upstream.start())
            names = [upstream.record.stem.split("-")[0] for upstream in upstreams]
            config = {"upstreams": [{"name": name, "transport": upstream.transport, "url": upstream.url}
                                    for name, upstream in zip(names, upstreams, strict=True)]
                      + [stdio_upstream_spec("stdio0")]}
            gateway = gateway_process(tmp, config)
            gateway.proc.env["AGENTBOX_GATEWAY_HEALTH_SECONDS"] = "5"  # the production default
            gateway.start()
            started.append(gateway)
            direct, through = [], []
            process = psutil.Process(gateway.proc.process.pid)
            upstream_process = psutil.Process(upstreams[0].proc.process.pid)
            direct_cpu = through_cpu = 0.0
            # Interleave rounds so drift on a shared machine hits both sides alike.
            for _ in range(ROUNDS):
                before = cpu_seconds(upstream_process)
                direct += await timed_calls(upstreams[0].url, "echo", calls // ROUNDS)
                direct_cpu += cpu_seconds(upstream_process) - before
                before = cpu_seconds(process)
                through += await timed_calls(gateway.url, "http0_echo", calls // ROUNDS)
                through_cpu += cpu_seconds(process) - before
            gateway_rss = process.memory_info().rss
            children_rss = sum(child.memory_info().rss for child in process.children(recursive=True))
            ratio = percentile(through, 0.5) / percentile(direct, 0.5)
            return {
                "benchmark": "gateway_tool_call",
                "calls_each": len(direct),
                "direct": summary(direct),
                "through_gateway": summary(through),
                "ratio_p50": round(ratio, 3),
                # Server CPU per call (warm-up included) is steadier than latency on a busy machine: the
                # gateway's own cost beside that of the upstream server it fronts.
                "upstream_cpu_ms_per_call": round(direct_cpu * 1000 / (len(direct) + ROUNDS * WARMUP), 3),
                "gateway_cpu_ms_per_call": round(through_cpu * 1000 / (len(through) + ROUNDS * WARMUP), 3),
                "target_ratio_p50": 2.0,
                "meets_target": ratio <= 2.0,
                "gateway_upstreams": len(config["upstreams"]),
                "gateway_rss_mib": round(gateway_rss / 2**20, 1),
                "gateway_stdio_children_rss_mib": round(children_rss / 2**20, 1),
            }
        finally:
            for item in reversed(started):
                item.proc.stop()


async def callgrind_control(*args: str) -> None:
    process = await asyncio.create_subprocess_exec("callgrind_control", *args, stdout=subprocess.DEVNULL)
    if await process.wait():
        raise RuntimeError(f"callgrind_control {' '.join(args)} failed")


def counted(directory: Path) -> int:
    """The instructions callgrind counted while instrumentation was on, from its dump files."""
    return max(int(line.split()[1]) for dump in directory.glob("callgrind.out*")
               for line in dump.read_text().splitlines() if line.startswith("totals:"))


async def instructions(calls: int) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        upstream = http_upstream(tmp, "streamable-http", "http0").start()
        gateway = gateway_process(tmp, {"upstreams": [{"name": "http0", "transport": "streamable-http",
                                                       "url": upstream.url}]})
        counts = tmp / "callgrind.out"
        gateway.proc.args = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                             f"--callgrind-out-file={counts}", *gateway.proc.args]
        gateway.proc.env.update(AGENTBOX_GATEWAY_HEALTH_SECONDS="3600", AGENTBOX_GATEWAY_POLL_SECONDS="3600")
        try:
            gateway.proc.start()
            wait_until(lambda: gateway.readiness()["connected"] == ["http0"], timeout=600, interval=1,
                       what="the gateway under callgrind")
            pid = str(gateway.proc.process.pid)
            async with Client(gateway.url, timeout=120) as client:
                for index in range(WARMUP):
                    await client.call_tool("http0_echo", {"text": f"w{index}"})
                await callgrind_control("--instr=on", pid)
                for index in range(calls):
                    await client.call_tool("http0_echo", {"text": str(index)})
                await callgrind_control("--instr=off", pid)
            await callgrind_control("--dump", pid)
            total = await asyncio.to_thread(counted, tmp)
            return {"benchmark": "gateway_tool_call_instructions", "calls": calls,
                    "gateway_instructions_per_call": total // calls}
        finally:
            gateway.proc.stop()
            upstream.proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int)
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead of timing")
    args = parser.parse_args()
    result = asyncio.run(instructions(args.calls or 100) if args.callgrind else run(args.calls or 300))
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
