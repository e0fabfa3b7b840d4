"""``make demo``: train the embedded default, evaluate, export, serve it and query it.

    python -m demo                                  # synthetic data (no downloads)
    python -m demo --data-dir ../shared/data/ml-100k    # MovieLens-100K instead
    python -m demo --tower sequence                 # the causal self-attention tower

Everything it starts (the API server) is stopped before it exits.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

from demo.client import serve_and_query

logger = logging.getLogger("shardrec.demo")


def train(data_dir: str | None, out: Path, tower: str = "mean") -> Path:
    from trainer.config import load_config
    from trainer.pipeline import run_training

    overrides = [f"out_dir={out}", f"model.tower={tower}"]
    if data_dir:
        cfg = load_config("configs/ml-100k.yaml", [f"data.data_dir={data_dir}", *overrides])
    else:
        cfg = load_config("configs/synthetic.yaml", overrides)
    print(f"== training {cfg.name} ({cfg.data.source}) into {out}", flush=True)
    return run_training(cfg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", help="MovieLens-100K folder; synthetic data when omitted")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument(
        "--tower",
        choices=["mean", "sequence"],
        default="mean",
        help="user tower: YouTube-DNN mean pooling, or causal self-attention",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    artifacts = train(args.data_dir, Path(args.out), args.tower)
    print(f"== artifacts in {artifacts}", flush=True)
    if importlib.util.find_spec("service") is None:
        print("== the REST service is not available in this build; stopping after training.")
        return 0
    return serve_and_query(artifacts)


if __name__ == "__main__":
    sys.exit(main())
