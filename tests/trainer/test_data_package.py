"""trainer.data as a package: its public names, and a config that imports without numpy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import trainer.data as data
from trainer.data import build, dataset, loader, sequences, synthetic, vocab

ROOT = Path(__file__).resolve().parents[2]


def test_public_names_come_from_their_modules():
    assert sorted(data.__all__) == sorted(data._EXPORTS)
    for name in data.__all__:
        assert getattr(data, name) is not None
    assert data.Dataset is dataset.Dataset and data.build_dataset is build.build_dataset
    assert data.history_batch is sequences.history_batch and data.IdIndex is vocab.IdIndex
    assert data.generate_synthetic is synthetic.generate and data.fingerprint is loader.fingerprint
    assert set(data.__all__) <= set(dir(data))
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = data.nope


def test_the_config_imports_without_numpy_torch_or_pyarrow():
    code = (
        "import sys\n"
        "import trainer.data.config\n"
        "from trainer.data import DataConfig, SyntheticConfig\n"
        "DataConfig(synthetic=SyntheticConfig(seed=1))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'torch', 'pyarrow'}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
