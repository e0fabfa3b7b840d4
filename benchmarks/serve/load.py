"""The HTTP load generator: raw asyncio streams, open loop (scheduled sends) or closed loop."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np


def recommend_request(payload: dict[str, Any], host: str, port: int) -> bytes:
    """One raw ``POST /v1/recommend`` HTTP/1.1 request (keep-alive) with ``payload`` as JSON."""
    body = json.dumps(payload).encode()
    head = (
        f"POST /v1/recommend HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def request_bytes(users: list[str], k: int, host: str, port: int) -> list[bytes]:
    """One request per known user: ``{"user_id": user, "k": k}``."""
    return [recommend_request({"user_id": user, "k": k}, host, port) for user in users]


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def _load(
    host: str,
    port: int,
    requests: list[bytes],
    rate: float | None,
    duration: float,
    connections: int,
) -> dict[str, object]:
    """Open loop at ``rate`` (scheduled sends) or, with ``rate=None``, closed loop."""
    total = int(rate * duration) if rate else 10**9
    queue: asyncio.Queue = asyncio.Queue()
    latencies: list[float] = []
    errors = 0
    completed = 0
    stop_at = [float("inf")]

    connected = 0
    all_connected = asyncio.Event()

    async def worker() -> None:
        nonlocal errors, completed, connected
        reader, writer = await asyncio.open_connection(host, port)
        connected += 1
        if connected == connections:
            all_connected.set()
        await all_connected.wait()
        try:
            while True:
                if rate:
                    i, scheduled = await queue.get()
                    if i < 0:
                        return
                else:
                    i, scheduled = completed + errors, time.perf_counter()
                    if scheduled >= stop_at[0]:
                        return
                writer.write(requests[i % len(requests)])
                try:
                    status = await _read_response(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    status = -1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                latencies.append(time.perf_counter() - scheduled)
                if status == 200:
                    completed += 1
                else:
                    errors += 1
        finally:
            writer.close()

    tasks = [asyncio.create_task(worker()) for _ in range(connections)]
    await asyncio.wait_for(all_connected.wait(), timeout=60)
    t0 = time.perf_counter()
    if rate:
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait((i, t0 + i / rate))
        for _ in tasks:
            queue.put_nowait((-1, 0.0))
    else:
        stop_at[0] = t0 + duration
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {
        "offered": rate or float("nan"),
        "achieved": completed / elapsed,
        "errors": errors,
        "requests": completed + errors,
        "p50": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p95": float(np.percentile(lat, 95)) if lat.size else float("nan"),
        "p99": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "max": float(lat.max()) if lat.size else float("nan"),
    }


def run_load(*args: Any) -> dict[str, object]:
    """Entry point of the load-generator process: `_load` of ``args`` under uvloop."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_load(*args))
