"""The service stays clear of the training side: ``import service``, every service module (the
app, the CLI, the loader included) and loading a model import none of pyarrow, Ray and matplotlib
(the ``train`` extra, absent from a ``shardrec[serve]`` install) nor the data layer
(``trainer.data``). Checked in a fresh interpreter, where nothing was imported yet."""

from __future__ import annotations

import json
from pathlib import Path

from tests.service.live import run_python

CHECK = """
import importlib, json, pkgutil, sys
import service

modules = [m.name for m in pkgutil.walk_packages(service.__path__, "service.")]
for name in modules:
    if not name.endswith("__main__"):  # running the CLI is not importing it
        importlib.import_module(name)
from service.app import create_app
from service.cli import build_parser
from service.index import IndexSettings
from service.loading import load_model
from service.settings import ServiceSettings

build_parser()
model = load_model(sys.argv[1], IndexSettings(kind="exact", save=False))
create_app(ServiceSettings.from_mapping({"artifacts": sys.argv[1]})).openapi()
heavy = sorted(
    m for m in sys.modules
    if m.split(".")[0] in ("pyarrow", "ray", "matplotlib") or m == "trainer.data" or m.startswith("trainer.data.")
)
print(json.dumps({"modules": modules, "heavy": heavy, "items": model.num_items}))
"""


def test_the_service_imports_no_training_dependencies(artifacts_a: Path) -> None:
    done = run_python(["-c", CHECK, str(artifacts_a)], timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    for name in ("service.app", "service.cli", "service.loading", "service.index.persistence"):
        assert name in result["modules"], result["modules"]
    assert result["items"] == 300
    assert result["heavy"] == [], f"the service imported {result['heavy']}"
