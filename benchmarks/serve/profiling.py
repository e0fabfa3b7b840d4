"""The py-spy profile: server CPU per request split by stage of the request path."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.serve import logger
from benchmarks.serve.wrk import run_wrk

# Stage of the request path -> substrings of a stack's frames (file paths, function names). The
# first six are matched anywhere in a stack (work done below them belongs to them); the rest by
# the frame nearest the leaf.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("FAISS search (service/index, faiss)", ("service/index/", "faiss/")),
    ("user tower (torch)", ("trainer/", "torch/")),
    ("store read", ("service/store", "sqlite3", "redis/")),
    ("model: prepare queries, results", ("service/model.py", "service/recommender.py")),
    (
        "response: build, validate, JSON",
        (
            "serialize_response",
            "jsonable_encoder",
            "json/encoder",
            "starlette/responses.py",
            "RecommendResponse",
            "ScoredItemOut",
            "orjson",
            "json_response",
            "routers/recommend.py:answer",
        ),
    ),
    (
        "request: JSON parse, validation, dependencies",
        (
            "fastapi/dependencies",
            "json/decoder",
            "json/__init__",
            "pydantic",
            "service/schemas",
            "service/deps",
            "Request.json",
            "Request.body",
            "parse_body",
            "get_request_handler",
        ),
    ),
    ("HTTP (uvicorn, httptools)", ("uvicorn/protocols", "httptools")),
    ("FastAPI's OpenTelemetry hooks", ("fastapi/telemetry", "opentelemetry", "trace/__init__")),
    (
        "ASGI middleware, routing, metrics",
        (
            "starlette/",
            "fastapi/",
            "service/metrics",
            "service/limits",
            "service/requestid",
            "service/hotpath",
            "prometheus_client",
        ),
    ),
    (
        "event loop, thread hand-off",
        (
            "asyncio/",
            "uvloop",
            "threading.py",
            "concurrent/futures",
            "service/batching",
            "queue.py",
            "anyio/",
        ),
    ),
]
_DEEP = 6


def stage_of(stack: str) -> str:
    """The `STAGES` name of one collapsed stack (``frame;frame;...``, root first)."""
    for name, keys in STAGES[:_DEEP]:
        if any(k in stack for k in keys):
            return name
    for frame in reversed(stack.split(";")):
        for name, keys in STAGES[_DEEP:]:
            if any(k in frame for k in keys):
                return name
    return "other"


def breakdown(raw: str) -> dict[str, float]:
    """Share of the samples per stage, from py-spy's ``--format raw`` output."""
    counts: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if stack:
            name = stage_of(stack)
            counts[name] = counts.get(name, 0) + int(n)
    total = max(1, sum(counts.values()))
    return {name: counts.get(name, 0) / total for name in [*(n for n, _ in STAGES), "other"]}


def profile(server, users_file: Path, args: argparse.Namespace, out: Path) -> list[list[object]]:
    """py-spy on the server while wrk loads it: CPU microseconds per request per stage."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cmd = [spy, "record", "--pid", str(server.pid), "--duration", str(int(args.profile))]
    cmd += ["--rate", "200", "--format", "raw", "--nonblocking", "-o", str(out)]
    recorder = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wrk_args = argparse.Namespace(**{**vars(args), "duration": args.profile})
    result = run_wrk(server, users_file, wrk_args)
    recorder.wait(timeout=120)
    if result is None or not out.exists():
        return []
    shares = breakdown(out.read_text())
    us = result["cpu_ms"] * 1000
    rows: list[list[object]] = [[name, share * 100, share * us] for name, share in shares.items()]
    rows.append(["total (server CPU per request)", 100.0, us])
    logger.info("profile: %.0f req/s under py-spy", result["rate"])
    return rows
