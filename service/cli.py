"""Command line: ``python -m service index ...`` and ``python -m service serve ...``.

``index`` builds the retrieval index of an artifact directory, measures its recall@k against
exact search on the model's own user vectors, saves it as ``<artifacts>/index-<kind>`` (which
``serve`` then loads instead of rebuilding) and prints the recall.

``serve`` runs the API with uvicorn; ``--workers N`` runs N processes that share the history
store, the model pointer (a reload through any of them moves all, see `service.fleet`) and
their Prometheus metrics (a fresh ``PROMETHEUS_MULTIPROC_DIR``, removed at exit).

The flags are generated from the settings (`service.settings`, pydantic-settings' CLI source):
every field is a flag (``--port``, ``--index.ef-search``), with the short spellings of
`SHORTCUTS` (``--kind``, ``--m``, ``--ef-search``, ...). Settings come from the flags, then
``SHARDREC_*`` environment variables (the admin token only from ``SHARDREC_ADMIN_TOKEN``, never a
flag, so it does not show in the process list), then the defaults; ``serve`` binds 127.0.0.1
unless told.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from pydantic_settings import CliSettingsSource

from service.metrics import MULTIPROC_ENV
from service.requestid import setup_logging
from service.settings import ArtifactSettings, ServiceSettings

logger = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2

# Short flags of nested settings (generated name -> extra spellings).
SHORTCUTS: dict[str, str] = {
    "index.kind": "kind",
    "index.hnsw-m": "m",
    "index.ef-search": "ef-search",
    "index.ef-construction": "ef-construction",
    "index.hnsw-metric": "hnsw-metric",
    "index.nlist": "nlist",
    "index.nprobe": "nprobe",
    "index.num-threads": "faiss-threads",
    "index.recall-queries": "recall-queries",
    "index.recall-k": "recall-k",
}
# Settings read from the environment only.
ENV_ONLY = ("admin_token", "api_keys", "redis_url")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, CliSettingsSource]]:
    """The parser and, per command, the settings source that reads its parsed flags."""
    parser = argparse.ArgumentParser(
        prog="python -m service", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True)
    index = sub.add_parser(
        "index",
        help="build, measure and save the index of an artifact dir",
        description="Build, measure and save the index of an artifact directory.",
        allow_abbrev=False,
    )
    serve = sub.add_parser(
        "serve",
        help="run the HTTP API (uvicorn)",
        description="Run the HTTP API (uvicorn).",
        allow_abbrev=False,
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="uvicorn worker processes (each loads the model; they share the history store, "
        "the model version and the metrics)",
    )
    sources = {
        "index": _flags(ArtifactSettings, index, {**SHORTCUTS, "index.dir": "out"}),
        "serve": _flags(ServiceSettings, serve, {**SHORTCUTS, "index.dir": "index-dir"}),
    }
    return parser, sources


# Kebab-case flags (--index.ef-search), --no-<flag> for booleans, no JSON values, and the
# SHARDREC_* variable of each setting in its help line.
_CLI_STYLE = {
    "cli_kebab_case": True,
    "cli_implicit_flags": True,
    "cli_avoid_json": True,
    "cli_show_env_vars": True,
}


def _flags(
    settings_cls: type[ArtifactSettings], parser: argparse.ArgumentParser, shortcuts: dict[str, str]
) -> CliSettingsSource:
    """Add the flags of ``settings_cls`` to ``parser``."""
    return CliSettingsSource(
        settings_cls,
        root_parser=parser,
        cli_shortcuts=shortcuts,
        add_argument_method=_add_flag,
        **_CLI_STYLE,
    )


def _add_flag(parser: Any, *names: str, **kwargs: Any) -> Any:
    """``parser.add_argument`` for generated flags: long options only (``--m``, as one letter
    would get ``-m``), and no flag for the settings of `ENV_ONLY`."""
    if kwargs.get("dest") in ENV_ONLY:
        return None
    names = tuple(f"-{n}" if len(n) == 2 and n != "-h" else n for n in names)
    return parser.add_argument(*names, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    parser, sources = build_parser()
    args = parser.parse_args(argv)
    settings_cls = ArtifactSettings if args.command == "index" else ServiceSettings
    try:
        settings = settings_cls(_cli_settings_source=sources[args.command](parsed_args=args))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors()
        )
        print(f"error: invalid settings: {problems}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command == "index":
        return run_index(settings)
    assert isinstance(settings, ServiceSettings)
    return run_serve(settings, args.workers)


def run_index(settings: ArtifactSettings) -> int:
    """Build the index of ``settings.artifacts``, print its recall, save it; 0 on success."""
    from service.index import set_num_threads
    from service.loading import load_or_build_index
    from trainer.artifacts import ArtifactError, check_artifacts, load_artifacts

    setup_logging(settings.log_level)
    index = settings.index
    try:
        set_num_threads(index.num_threads)
        artifacts = load_artifacts(settings.artifacts)
        check_artifacts(artifacts)
    except (ArtifactError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = index.directory(settings.artifacts)
    if (out / "index.json").exists():
        logger.info("replacing the index in %s", out)
        # load_or_build_index would reuse a matching index; `index` always rebuilds.
        shutil.rmtree(out)
    start = time.perf_counter()
    built, info = load_or_build_index(artifacts, index, out)
    seconds = time.perf_counter() - start
    recall = info.recall
    if recall is None:
        measured = "recall not measured"
    elif recall.num_queries == 0:
        measured = f"recall@{recall.k} = 1 (exact search)"
    else:
        measured = f"recall@{recall.k} = {recall.recall:.4f} on {recall.num_queries} user vectors"
    print(
        f"{index.kind} index of {built.ntotal} items (dim {built.dim}) {info.params}: "
        f"{measured}; built in {seconds:.1f}s, saved to {info.path}"
    )
    return 0 if info.path is not None else 1


def run_serve(settings: ServiceSettings, workers: int = 1) -> int:
    """Run uvicorn with ``settings`` until interrupted."""
    import uvicorn

    from service.app import create_app

    if workers < 1:
        print(f"error: --workers must be >= 1, got {workers}", file=sys.stderr)
        return EXIT_BAD_INPUT
    setup_logging(settings.log_level)
    logger.info("serving %s on http://%s:%d", settings.artifacts, settings.host, settings.port)
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "access_log": settings.access_log,
        "log_config": None,  # keep the logging configured above
        "timeout_graceful_shutdown": 10,
    }
    if workers == 1:
        uvicorn.run(create_app(settings), **common)
        return 0
    # Worker processes build their app from the environment: hand them these settings, and a
    # fresh directory for their shared metrics.
    os.environ.update(settings_environment(settings))
    metrics_dir = tempfile.mkdtemp(prefix="shardrec-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        uvicorn.run("service.app:create_app_from_env", factory=True, workers=workers, **common)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def settings_environment(settings: ServiceSettings) -> dict[str, str]:
    """``SHARDREC_*`` variables that rebuild ``settings`` (the admin token, already in the
    environment, excepted)."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json", exclude=set(ENV_ONLY)).items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            key = f"SHARDREC_{name}_{sub}" if sub else f"SHARDREC_{name}"
            if isinstance(v, list):
                v = ",".join(map(str, v))
            env[key.upper()] = "null" if v is None else str(v)
    return env
