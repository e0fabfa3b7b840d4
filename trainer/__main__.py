"""``python -m trainer train|evaluate``: the training command line."""

from __future__ import annotations

import argparse
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description="shardrec trainer")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train, evaluate on the test split, export artifacts")
    t.add_argument("--config", help="YAML config (configs/*.yaml); defaults when omitted")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. epochs=3")
    t.add_argument("--data-dir", help="folder of the MovieLens files (sets data.data_dir)")
    t.add_argument("--out", help="run directory (sets out_dir)")
    t.add_argument(
        "--storage", help="checkpoints and artifacts: a path or a URI (s3://...); default --out"
    )
    t.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    t.add_argument("--num-shards", type=int, help="embedding shard actors (Ray)")
    t.add_argument("--num-workers", type=int, help="trainer workers (Ray)")
    t.add_argument("--ray-address", help="Ray cluster address ('auto'); embedded Ray if omitted")
    t.add_argument("--mode", choices=["sync", "async"], help="distributed update mode")
    e = sub.add_parser("evaluate", help="full-ranking metrics of an artifact directory")
    e.add_argument("--artifacts", required=True, help="artifact directory")
    e.add_argument("--data-dir", help="folder of the data, if it moved since training")
    for q in (t, e):
        q.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from trainer.config import load_config
    from trainer.pipeline import artifact_table, evaluate_artifacts, run_training

    try:
        if args.command == "train":
            overrides = list(args.overrides)
            flags = {
                "data.data_dir": args.data_dir,
                "out_dir": args.out,
                "storage": args.storage,
                "distributed.num_shards": args.num_shards,
                "distributed.num_workers": args.num_workers,
                "distributed.ray_address": args.ray_address,
                "distributed.mode": args.mode,
            }
            overrides += [f"{k}={v}" for k, v in flags.items() if v is not None]
            cfg = load_config(args.config, overrides)
            path = run_training(cfg, resume=args.resume)
            print(artifact_table(path))
            print(f"artifacts: {path}")
        else:
            _, table = evaluate_artifacts(args.artifacts, args.data_dir, progress=True)
            print(table)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
