"""Serve an artifact directory and show what the API answers (the second half of ``make demo``).

    python -m demo.client --artifacts runs/synthetic/artifacts

`serve_and_query` starts ``python -m service serve`` on a free 127.0.0.1 port
(`service.launch`), waits until the model is loaded, then asks it, and prints readably:

1. the model being served (``GET /v1/model``);
2. the top-10 of a known user, with titles and scores (``POST /v1/recommend``);
3. the items most similar to the most popular item (``GET /v1/items/{id}/similar``);
4. three watches appended to that user's history (``POST /v1/users/{id}/events``), and the
   user's fresh top-10, marked with what changed.

The server is always stopped before it returns, also on Ctrl-C or an error. Only the standard
library talks to the server, so it runs wherever the service does. The events are written with
an API key made up for the run (``SHARDREC_API_KEYS`` of the server it starts).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from service.launch import LaunchError, LocalServer, launch, request_json

logger = logging.getLogger(__name__)

TOP_K = 10
WATCHES = 3
CANDIDATES = 100  # similar items the demo's watches are chosen from


class DemoError(RuntimeError):
    """The server did not start, or answered a request with an error."""


class Api:
    """JSON over HTTP with the standard library; raises `DemoError` on a non-2xx answer.
    ``api_key`` is sent as ``Authorization: Bearer`` (event writes need one)."""

    def __init__(self, base_url: str, timeout: float = 30.0, api_key: str | None = None) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.api_key = api_key

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        return request_json(self.base_url + path, method, body, headers, self.timeout)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.request(method, path, body)
        if not 200 <= status < 300:
            raise DemoError(f"{method} {path} answered {status}: {answer}")
        return answer


def quote(item_id: str) -> str:
    return urllib.parse.quote(item_id, safe="")


# --- the server ----------------------------------------------------------------------------------
def _log_path(artifacts: Path) -> Path:
    """``<run dir>/demo-server.log`` when writable, else a temporary file."""
    path = artifacts.resolve().parent / "demo-server.log"
    try:
        path.open("w").close()
        return path
    except OSError:
        fd, name = tempfile.mkstemp(prefix="shardrec-demo-server-", suffix=".log")
        with open(fd, "w"):
            pass
        return Path(name)


@contextlib.contextmanager
def running_server(
    artifacts: Path, timeout: float, out: TextIO, port: int | None = None
) -> Iterator[Api]:
    """``python -m service serve`` on 127.0.0.1 (`service.launch`), ready; stopped when the
    block exits. The server accepts one API key, made up here, for the demo's event writes."""
    log = _log_path(artifacts)
    api_key = secrets.token_urlsafe(24)
    env = {**os.environ, "SHARDREC_API_KEYS": api_key}
    shown = [-2.0]

    def announce(server: LocalServer) -> None:
        print(f"== starting the API on {server.url} (server log: {log})", file=out)
        out.flush()

    def progress(status: str, waited: float) -> None:
        if waited - shown[0] >= 2.0:
            print(f"   ... waiting for the model to load ({status}, {waited:.0f}s)", file=out)
            out.flush()
            shown[0] = waited

    try:
        with launch(
            artifacts, log, timeout, port=port, env=env, progress=progress, on_start=announce
        ) as (server, ready):
            print(f"   ready: model {ready.get('model_version')}", file=out)
            yield Api(server.url, api_key=api_key)
    except LaunchError as e:
        raise DemoError(str(e)) from None


# --- what the demo shows -----------------------------------------------------------------------
def known_user(artifacts: Path) -> str:
    """The first training user of the artifacts (``users.csv``)."""
    with (artifacts / "users.csv").open(newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f)
        for row in rows:
            return row["original_id"]
    raise DemoError(f"{artifacts / 'users.csv'} lists no user")


def catalogue(artifacts: Path) -> list[tuple[str, str]]:
    """(id, title) of every item, most popular first (``items.csv``; titles may be empty)."""
    with (artifacts / "items.csv").open(newline="", encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f), key=lambda row: int(row["index"]))
    if not rows:
        raise DemoError(f"{artifacts / 'items.csv'} lists no item")
    return [(row["original_id"], row.get("title") or "") for row in rows]


def _label(item_id: str, titles: dict[str, str]) -> str:
    title = titles.get(item_id)
    return f"{item_id} ({title})" if title else item_id


def format_items(items: list[dict[str, Any]], before: list[dict[str, Any]] | None = None) -> str:
    """A ranked table (titles when the catalogue has them); with ``before``, each row says how
    its rank changed."""
    old_rank = {it["item_id"]: r for r, it in enumerate(before or [], 1)}
    width = max([len(it["item_id"]) for it in items] + [4])
    titled = any(it.get("title") for it in items)
    header = f"   {'#':>3}  {'item':<{width}}  {'score':>9}"
    header += f"  {'title':<40}" if titled else ""
    lines = [header + ("  change" if before is not None else "")]
    for rank, it in enumerate(items, 1):
        line = f"   {rank:>3}  {it['item_id']:<{width}}  {it['score']:>9.4f}"
        if titled:
            line += f"  {(it.get('title') or '-')[:40]:<40}"
        if before is not None:
            was = old_rank.get(it["item_id"])
            if was is None:
                line += "  new"
            elif was != rank:
                line += f"  {'up' if was > rank else 'down'} from {was}"
            else:
                line += "  ="
        lines.append(line)
    return "\n".join(line.rstrip() for line in lines)


def demo(api: Api, artifacts: Path, out: TextIO) -> None:
    """The requests of the demo, printed to ``out``."""

    def show(text: str = "") -> None:
        print(text, file=out)
        out.flush()

    model = api.call("GET", "/v1/model")
    index = model.get("index", {})
    recall = index.get("recall") or {}
    show(
        f"\n== model {model['model_version']}: {model['num_items']} items, {model['num_users']} "
        f"users, dimension {model['embedding_dim']}; {index.get('kind')} index"
        + (f", recall@{recall['k']} {recall['recall']:.3f}" if recall else "")
    )

    items = catalogue(artifacts)
    titles = dict(items)
    user = known_user(artifacts)
    history = api.call("GET", f"/v1/users/{quote(user)}/history?limit=100000")
    latest = ", ".join(_label(i, titles) for i in history["items"][-3:])
    show(f"\n== user {user}: {history['length']} watches, the latest: {latest}")
    first = api.call("POST", "/v1/recommend", {"user_id": user, "k": TOP_K})
    show(f"   top-{TOP_K} ({first['source']}, {first['history_length']} history items used):")
    show(format_items(first["items"]))

    item = items[0][0]
    similar = api.call("GET", f"/v1/items/{quote(item)}/similar?k={CANDIDATES}")
    show(f"\n== the {TOP_K} items most similar to the most popular item, {_label(item, titles)}:")
    show(format_items(similar["items"][:TOP_K]))

    # Items like it that the user has not watched yet, so the history really grows.
    unseen = [it["item_id"] for it in similar["items"] if it["item_id"] not in history["items"]]
    watched = (unseen or [it["item_id"] for it in similar["items"]])[:WATCHES]
    events = api.call("POST", f"/v1/users/{quote(user)}/events", {"items": watched})
    show(
        f"\n== user {user} watches {len(watched)} items like it: "
        f"{', '.join(_label(i, titles) for i in watched)} "
        f"(history now {events['history_length']} events)"
    )
    fresh = api.call("POST", "/v1/recommend", {"user_id": user, "k": TOP_K})
    show(f"   fresh top-{TOP_K} ({fresh['history_length']} history items used):")
    show(format_items(fresh["items"], before=first["items"]))
    now = {it["item_id"] for it in fresh["items"]}
    gone = [it["item_id"] for it in first["items"] if it["item_id"] not in now]
    seen = [i for i in gone if i in watched]
    show(
        f"   {TOP_K - len(gone)} kept, {len(gone)} new"
        + (f"; left the list: {', '.join(gone)}" if gone else "")
        + (f" ({', '.join(seen)} now watched: history is never recommended)" if seen else "")
    )


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (main thread only), so the server is stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve_and_query(
    artifacts: Path, *, timeout: float = 300.0, port: int | None = None, out: TextIO | None = None
) -> int:
    """Serve ``artifacts``, run the demo requests, stop the server. 0 on success, 1 on an
    error, 130 when interrupted."""
    out = out or sys.stdout
    artifacts = Path(artifacts)
    try:
        with _sigterm_as_interrupt(), running_server(artifacts, timeout, out, port) as api:
            demo(api, artifacts, out)
    except KeyboardInterrupt:
        print("\n== interrupted; the API server was stopped", file=out)
        return 130
    except (DemoError, OSError, KeyError, ValueError) as e:
        print(f"\n== demo failed: {e}", file=out)
        return 1
    print("\n== done; the API server was stopped", file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--artifacts", type=Path, required=True, help="artifact directory")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the model")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    return serve_and_query(args.artifacts, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
