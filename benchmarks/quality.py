"""Quality under one protocol: popularity, our towers and an independent SASRec, same split.

    python -m benchmarks.quality --data-dir ../shared/data --datasets ml-100k --seeds 0 1 2
    python -m benchmarks.quality --data-dir ../shared/data --datasets ml-1m --models mean sasrec

Every row of a data set uses the one ``Dataset`` object loaded from configs/<dataset>.yaml (its
leave-last-out split, its items) and is scored by ``trainer.metrics.evaluate`` on the test
split: full ranking over all items, the user's whole earlier history excluded, the best epoch
on validation NDCG@10, the mean over seeds. Rows (``--models``):

* ID-only (no user features, no item side features, no example age): ``popularity``, ``mean``
  (our mean-pooled YouTube-DNN tower, sampled softmax), ``sequence`` and ``sequence-full`` (our
  self-attention tower, ``model.tower=sequence``, sampled / full softmax; skipped when this
  build has no such tower) and ``sasrec`` (pmixer/SASRec.pytorch's model, ``benchmarks.sasrec``);
  ``sasrec-recbole`` (RecBole's SASRec, ``benchmarks.peer``) is opt-in: ~120 examples/s here
* with side features, as configs/<dataset>.yaml has them: ``features`` and ``features-full``.

"train s" is the whole fit (training and per-epoch validation), "ex/s" the training targets
per second of the training epochs alone (validation excluded), both means over seeds.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, table
from trainer import metrics
from trainer.config import TrainConfig, load_config
from trainer.data import Dataset, load_dataset
from trainer.train import Trainer, score_function

DATASETS = {"ml-100k": "ml-100k", "ml-1m": "ml-1m-partial"}
COLUMNS = ["HR@10", "HR@50", "HR@100", "NDCG@10", "NDCG@50"]
KS = (10, 50, 100)
ID_ONLY = [
    "model.use_user_features=false",
    "model.use_item_features=false",
    "model.use_example_age=false",
]
SEQUENCE = ["model.tower=sequence"]
FULL = ["loss.kind=full"]

# name -> (label, section, config suffix, overrides); popularity and sasrec are not our trainer.
# A suffix picks configs/<dataset><suffix>.yaml when it exists (the sequence tower's tuned
# configs/<dataset>-sequence.yaml), else configs/<dataset>.yaml with the overrides.
OURS = {
    "mean": ("ours, mean tower, sampled softmax", "id", "", ID_ONLY),
    "sequence": ("ours, sequence tower, sampled softmax", "id", "-sequence", ID_ONLY + SEQUENCE),
    "sequence-full": (
        "ours, sequence tower, full softmax",
        "id",
        "-sequence",
        ID_ONLY + SEQUENCE + FULL,
    ),
    "features": ("ours, mean tower + features, sampled softmax", "features", "", []),
    "features-full": ("ours, mean tower + features, full softmax", "features", "", FULL),
}
MODELS = [
    "popularity",
    "mean",
    "sequence",
    "sequence-full",
    "sasrec",
    "sasrec-recbole",
    "features",
    "features-full",
]
DEFAULT_MODELS = [m for m in MODELS if m != "sasrec-recbole"]  # RecBole: ~120 ex/s on 2 cores
SECTIONS = {"id": "ID-only (no side features)", "features": "with side features"}

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """One model trained with one seed and evaluated on the test split (history excluded).

    ``examples`` counts the training targets over all epochs run; 0 for popularity.
    """

    metrics: dict[str, float]
    seconds: float = 0.0
    train_seconds: float = 0.0
    examples: int = 0
    epochs: int = 0


@dataclass
class Row:
    """A table row: a model's runs over the seeds."""

    label: str
    section: str
    runs: list[Run] = field(default_factory=list)
    source: str = ""  # the config and overrides (or the peer) that produced it

    def mean(self, key: str) -> float:
        return float(np.mean([r.metrics[key] for r in self.runs]))

    def cells(self) -> list[object]:
        """``[label, *means of COLUMNS, epochs, train s, ex/s]`` ("-" where nothing trained)."""
        means = [f"{self.mean(c):.3f}" for c in COLUMNS]
        if not any(r.examples for r in self.runs):
            return [self.label, *means, "-", "-", "-"]
        rate = sum(r.examples for r in self.runs) / sum(r.train_seconds for r in self.runs)
        return [
            self.label,
            *means,
            float(np.mean([r.epochs for r in self.runs])),
            float(np.mean([r.seconds for r in self.runs])),
            rate,
        ]


def ratio(a: Row | None, b: Row | None, key: str) -> float | None:
    """``a``'s mean ``key`` over ``b``'s, or None when a row is missing or ``b``'s is 0."""
    if a is None or b is None or not a.runs or not b.runs or b.mean(key) == 0:
        return None
    return a.mean(key) / b.mean(key)


def comparisons(rows: dict[str, Row]) -> list[str]:
    """Lines with the issue's ratios, for whichever rows are present."""
    checks = [
        ("sequence", "mean", "HR@10", 1.25),
        ("sequence", "mean", "NDCG@10", 1.25),
        ("sequence", "sasrec", "HR@10", 1.0),
        ("sequence", "sasrec", "NDCG@10", 1.0),
        ("sequence", "sequence-full", "HR@10", 0.97),
        ("mean", "sasrec", "HR@10", None),
        ("mean", "sasrec", "NDCG@10", None),
    ]
    out = []
    for a, b, key, goal in checks:
        r = ratio(rows.get(a), rows.get(b), key)
        if r is not None:
            target = (
                "" if goal is None else f" (target >= {goal:g}: {'met' if r >= goal else 'missed'})"
            )
            out.append(f"* {key} {a} / {b}: {r:.3f}x{target}")
    return out


def per_seed(rows: dict[str, Row], seeds: list[int]) -> list[str]:
    """One line per trained row: what produced it, HR@10 / NDCG@10 of each seed."""
    out = [f"* {name}: {row.source}" for name, row in rows.items() if row.source]
    for name, row in rows.items():
        if any(r.examples for r in row.runs):
            hr = " / ".join(f"{r.metrics['HR@10']:.3f}" for r in row.runs)
            nd = " / ".join(f"{r.metrics['NDCG@10']:.3f}" for r in row.runs)
            out.append(f"* {name}, seeds {seeds}: HR@10 {hr}; NDCG@10 {nd}")
    return out


def render(name: str, ds_summary: str, rows: dict[str, Row], seeds: list[int]) -> str:
    """The markdown for one data set: a table per section, then ratios and per-seed figures."""
    headers = ["model", *COLUMNS, "epochs", "train s", "ex/s"]
    out = [f"### {name} ({ds_summary}), mean of seeds {seeds}", ""]
    for section, title in SECTIONS.items():
        cells = [r.cells() for r in rows.values() if r.section == section]
        if cells:
            out += [f"{title}:", "", table(headers, cells), ""]
    out += [*comparisons(rows), *per_seed(rows, seeds), ""]
    return "\n".join(out)


class TimedTrainer(Trainer):
    """Our trainer, also counting the seconds spent in training epochs (not validation)."""

    train_seconds = 0.0

    def train_epoch(self) -> float:
        start = time.perf_counter()
        try:
            return super().train_epoch()
        finally:
            self.train_seconds += time.perf_counter() - start


def model_config(config: str, data_dir: Path, overrides: list[str]) -> TrainConfig:
    return load_config(
        config,
        [
            f"data.data_dir={data_dir}",
            "progress=false",
            f"out_dir={tempfile.gettempdir()}/shardrec-quality/{time.time_ns()}",
            *overrides,
        ],
    )


def run_ours(cfg: TrainConfig, ds: Dataset) -> Run:
    """Train our model on ``ds`` and evaluate its best epoch on the test split."""
    trainer = TimedTrainer(cfg, ds)
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    trainer.load_best()
    enc, tables = trainer.encoder()
    result = metrics.evaluate(ds, score_function(enc, tables, ds), "test", ks=KS)
    epochs = len(trainer.curves)
    per_epoch = trainer.examples_in(trainer.epoch_order(0))  # targets (all of a window's)
    return Run(result["filtered"], seconds, trainer.train_seconds, epochs * per_epoch, epochs)


def run_popularity(ds: Dataset) -> Run:
    return Run(metrics.evaluate(ds, metrics.popularity_score_fn(ds), "test", ks=KS)["filtered"])


def run_sasrec(ds: Dataset, seed: int, args: argparse.Namespace) -> Run:
    """pmixer/SASRec.pytorch's model on our split (``benchmarks.sasrec``)."""
    from benchmarks import sasrec

    p = sasrec.train_sasrec(
        ds, seed, epochs=args.peer_epochs, eval_every=args.peer_eval_every,
        patience=args.peer_patience,
    )  # fmt: skip
    result = metrics.evaluate(ds, p.score_fn, "test", ks=KS)
    return Run(result["filtered"], p.seconds, p.train_seconds, p.examples, p.epochs)


def run_recbole(ds: Dataset, seed: int, args: argparse.Namespace) -> Run:
    """RecBole's SASRec on our split (``benchmarks.peer``); patience in epochs."""
    from benchmarks import peer

    with tempfile.TemporaryDirectory(prefix="shardrec-recbole-") as work:
        p = peer.train_sasrec(
            ds, Path(work), seed, epochs=args.peer_epochs, patience=args.peer_patience
        )
        result = metrics.evaluate(ds, p.score_fn, "test", ks=KS)
    return Run(result["filtered"], p.seconds, p.train_seconds, p.examples, p.epochs)


@dataclass
class Spec:
    """How to produce a row: its label, section, a one-line source and ``run(ds, seed)``."""

    label: str
    section: str
    source: str
    run: Callable[[Dataset, int], Run]


def runners(
    config: str, data_dir: Path, args: argparse.Namespace, extra: dict[str, list[str]]
) -> dict[str, Spec | str]:
    """name -> its ``Spec``, or a reason string when the row cannot run in this build."""
    from benchmarks import peer, sasrec

    peer_args = (
        f"--peer-epochs {args.peer_epochs} --peer-eval-every {args.peer_eval_every} "
        f"--peer-patience {args.peer_patience}"
    )
    out: dict[str, Spec | str] = {
        "popularity": Spec("popularity", "id", "", lambda ds, seed: run_popularity(ds)),
        "sasrec": Spec(
            "SASRec (pmixer/SASRec.pytorch model, independent)",
            "id",
            f"benchmarks/sasrec.py, {sasrec.SASRecArgs()} (maxlen = data.max_history), {peer_args}",
            lambda ds, seed: run_sasrec(ds, seed, args),
        ),
    }
    if peer.recbole_available():
        out["sasrec-recbole"] = Spec(
            f"SASRec (RecBole {peer.RECBOLE_VERSION}, independent)",
            "id",
            f"benchmarks/peer.py, {peer.SASREC}, --peer-epochs {args.peer_epochs}",
            lambda ds, seed: run_recbole(ds, seed, args),
        )
    else:
        out["sasrec-recbole"] = f"RecBole is not installed ({peer.INSTALL})"
    base = model_config(config, data_dir, [])
    for name, (label, section, suffix, overrides) in OURS.items():
        own = Path(config).with_name(Path(config).stem + suffix + ".yaml")
        path = str(own) if suffix and own.exists() else config
        overrides = [*overrides, *extra.get(name, [])]
        try:
            cfg = model_config(path, data_dir, overrides)
        except ValueError as e:
            out[name] = f"not in this build ({str(e)[:160]})"
            continue
        if cfg.data != base.data:
            raise ValueError(
                f"{path} loads other data than {config} ({cfg.data} vs {base.data}); every row "
                f"must use the same split. Align the data sections."
            )

        def run(ds: Dataset, seed: int, path: str = path, overrides: list[str] = overrides) -> Run:
            return run_ours(model_config(path, data_dir, [f"seed={seed}", *overrides]), ds)

        out[name] = Spec(label, section, f"{path} {' '.join(overrides)}".strip(), run)
    return out


def run_dataset(name: str, config: str, data_dir: Path, args: argparse.Namespace) -> str:
    """Train and evaluate every requested row on one data set; its markdown."""
    extra = {
        "sequence": args.sequence_overrides,
        "sequence-full": args.sequence_overrides,
        "mean": args.mean_overrides,
    }
    ds = load_dataset(model_config(config, data_dir, []).data)
    rows: dict[str, Row] = {}
    skipped = []
    for model, spec in runners(config, data_dir, args, extra).items():
        if model not in args.models:
            continue
        if isinstance(spec, str):
            skipped.append(f"* {model}: skipped, {spec}")
            continue
        row = Row(spec.label, spec.section, source=spec.source)
        for seed in args.seeds if model != "popularity" else args.seeds[:1]:
            row.runs.append(spec.run(ds, seed))
            logger.warning("%s %s seed %d: %s", name, model, seed, row.runs[-1])
        rows[model] = row
    rows = {m: rows[m] for m in MODELS if m in rows}
    return render(name, ds.summary(), rows, args.seeds) + "\n".join(skipped)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=MODELS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--peer-epochs", type=int, default=200, help="SASRec epochs (cap)")
    p.add_argument("--peer-eval-every", type=int, default=5, help="SASRec: epochs per validation")
    p.add_argument(
        "--peer-patience", type=int, default=5, help="SASRec: validations without improvement"
    )
    p.add_argument("--sequence-overrides", nargs="*", default=[], help="extra key=value")
    p.add_argument("--mean-overrides", nargs="*", default=[], help="extra key=value")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = [f"Machine: {machine()}", ""]
    for name in args.datasets:
        out.append(run_dataset(name, f"configs/{name}.yaml", args.data_dir / DATASETS[name], args))
    text = "\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    main()
