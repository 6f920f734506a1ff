"""Exec overhead: our exec server's round trip against `docker exec` and a fresh subprocess, and
sandbox start times for bwrap, docker and process. Prints medians and ratios from one run.

    python bench/exec_overhead.py [--rounds 30] [--starts 8] [--image llm-sandbox/base:bookworm]

Targets (issue 2): round trip through the exec server >= 10x faster than `docker exec` into the
same container (how the LLM-in-Sandbox package runs every command); bwrap start >= 5x faster than
docker start. Backends that are not available here are reported as skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial

from sandbox_agent.backends import BwrapSandbox, DockerSandbox, ProcessSandbox, SandboxConfig
from sandbox_agent.backends.base import Sandbox
from sandbox_agent.backends.bwrap import bwrap_path
from sandbox_agent.backends.docker import docker_reachable
from sandbox_agent.execclient import ExecClient

COMMANDS = {
    "true": "true",
    "echo": "echo hello world",
    "1MB out": "head -c 1000000 /dev/zero | tr '\\0' x",
}
OUTPUT_CAP = 2 * 1024 * 1024


async def median_seconds(fn: Callable[[], Awaitable[object]], rounds: int) -> float:
    await fn()  # warm-up: connection pools, page cache
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def sync_median(fn: Callable[[], object], rounds: int) -> float:
    fn()
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def run_fresh(cmd: str) -> object:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, check=True)


def run_docker_exec(container: str, cmd: str) -> object:
    return subprocess.run(
        ["docker", "exec", container, "bash", "-c", cmd], capture_output=True, check=True
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.2f} ms"


async def exec_round_trips(image: str, rounds: int) -> None:
    print("\n== exec round trip (median of", rounds, "runs) ==")
    fresh: dict[str, float] = {}
    for label, cmd in COMMANDS.items():
        fresh[label] = sync_median(partial(run_fresh, cmd), rounds)
    if not docker_reachable():
        print("docker: skipped (no engine); fresh subprocess only")
        for label in COMMANDS:
            print(f"{label:8s} fresh subprocess {ms(fresh[label])}")
        return
    sandbox = DockerSandbox(SandboxConfig(image=image))
    endpoint = await sandbox.start()
    try:
        async with ExecClient(endpoint) as client:
            print(
                f"{'command':8s} {'exec server':>12s} {'docker exec':>12s} {'subprocess':>12s}  ratio(docker exec / ours)"
            )
            for label, cmd in COMMANDS.items():
                ours = await median_seconds(
                    partial(client.exec, cmd, 30, max_output_bytes=OUTPUT_CAP), rounds
                )
                docker_exec = sync_median(
                    partial(run_docker_exec, sandbox.container_name, cmd), rounds
                )
                print(
                    f"{label:8s} {ms(ours)} {ms(docker_exec)} {ms(fresh[label])}  "
                    f"{docker_exec / ours:6.1f}x"
                )
    finally:
        await sandbox.stop()


async def start_time(cls: type[Sandbox], config: SandboxConfig, rounds: int) -> float:
    async def once() -> None:
        sandbox = cls(config)
        try:
            await sandbox.start()
        finally:
            await sandbox.stop()

    samples = []
    await once()
    for _ in range(rounds):
        started = time.perf_counter()
        sandbox = cls(config)
        try:
            await sandbox.start()
            samples.append(time.perf_counter() - started)
        finally:
            await sandbox.stop()
    return statistics.median(samples)


async def start_times(image: str, rounds: int) -> None:
    print("\n== sandbox start, until the exec server is ready (median of", rounds, "runs) ==")
    results: dict[str, float] = {}
    results["process"] = await start_time(ProcessSandbox, SandboxConfig(), rounds)
    if bwrap_path():
        results["bwrap"] = await start_time(BwrapSandbox, SandboxConfig(), rounds)
    if docker_reachable():
        results["docker"] = await start_time(DockerSandbox, SandboxConfig(image=image), rounds)
    for name, seconds in results.items():
        print(f"{name:8s} {ms(seconds)}")
    for name in ("bwrap", "docker"):
        if name not in results:
            print(f"{name:8s} skipped (not available)")
    if "bwrap" in results and "docker" in results:
        print(f"docker start / bwrap start: {results['docker'] / results['bwrap']:.1f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--starts", type=int, default=8)
    parser.add_argument("--image", default="llm-sandbox/base:bookworm")
    args = parser.parse_args()
    asyncio.run(exec_round_trips(args.image, args.rounds))
    asyncio.run(start_times(args.image, args.starts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
