"""``shardrec <command> ...``: the console script of the package.

    shardrec train --config configs/synthetic.yaml      = python -m trainer train ...
    shardrec evaluate --artifacts runs/x/artifacts      = python -m trainer evaluate ...
    shardrec index --artifacts runs/x/artifacts         = python -m service index ...
    shardrec serve --artifacts runs/x/artifacts         = python -m service serve ...

Each command hands its arguments, unchanged, to the command line of its package. Training
needs the ``train`` extra (Ray, pyarrow, matplotlib), serving the ``serve`` extra (FastAPI,
uvicorn, FAISS): a command whose extra is not installed says which one to install.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

# command -> (the extra it needs, what it does)
COMMANDS = {
    "train": ("train", "train, evaluate on the test split, export artifacts (python -m trainer)"),
    "evaluate": ("train", "full-ranking metrics of an artifact directory (python -m trainer)"),
    "index": ("serve", "build and save the FAISS index of artifacts (python -m service)"),
    "serve": ("serve", "the REST API over artifacts (python -m service)"),
}
# The top-level modules each extra brings (pyproject.toml's optional dependencies).
EXTRA_MODULES = {
    "train": {"ray", "pyarrow", "matplotlib"},
    "serve": {"fastapi", "starlette", "uvicorn", "faiss", "prometheus_client", "orjson", "redis"},
}
EXIT_USAGE = 2


def usage() -> str:
    lines = ["usage: shardrec {" + ",".join(COMMANDS) + "} [arguments]", ""]
    lines += [f"  {name:<9} {what}" for name, (_, what) in COMMANDS.items()]
    lines += ["", "shardrec COMMAND --help: the arguments of COMMAND"]
    return "\n".join(lines)


def _run(command: str, argv: list[str]) -> int:
    if COMMANDS[command][0] == "train":
        from trainer.__main__ import main as trainer_main

        return trainer_main([command, *argv])
    from service.cli import main as service_main

    return service_main([command, *argv])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else EXIT_USAGE
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"shardrec: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _run(command, rest)
    except ModuleNotFoundError as e:
        extra = COMMANDS[command][0]
        if (e.name or "").split(".")[0] not in EXTRA_MODULES[extra]:
            raise
        print(
            f"shardrec {command}: the module {e.name!r} is not installed; `shardrec "
            f"{command}` needs the {extra!r} extra: pip install 'shardrec[{extra}]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
