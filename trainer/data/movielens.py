"""MovieLens 100K and 1M (GroupLens): ``load_movielens(source, data_dir, ...)``.

Each release (``RELEASES``) names its files and a reader that turns its folder into rating rows
and side tables; ``build_dataset`` does the rest. Every rating counts as an interaction
(implicit feedback; the rating value is ignored). User features: ``gender``, ``age`` (the ML-1M
age groups; ML-100K ages are bucketed the same way) and ``occupation`` (names). Item features:
the genres; titles from the item file (latin-1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data.build import build_dataset
from trainer.data.dataset import Dataset
from trainer.data.features import ItemTable, UserTable
from trainer.data.readers import read_delimited, to_ids, to_timestamps

logger = logging.getLogger(__name__)

ML100K_FILES = ("u.data", "u.item", "u.user")
ML1M_FILES = ("ratings.dat", "movies.dat", "users.dat")

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip
ML1M_GENRES = ML100K_GENRES[1:]
AGE_GROUPS = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55",
              56: "56+"}  # fmt: skip
ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
]  # fmt: skip
GENDERS = ["F", "M"]


@dataclass
class Release:
    """A MovieLens release read from its folder (by ``RELEASES[source].read``).

    Attributes:
        ratings: the ratings file, named in messages.
        rows: ``(user_ids, item_ids, timestamps)``, ``[R]`` each, one per rating.
        items, users: the side tables.
        genres: the genre names, in the order of the item feature vocabulary.
    """

    ratings: Path
    rows: tuple[np.ndarray, np.ndarray, np.ndarray]
    items: ItemTable
    users: UserTable
    genres: list[str]


@dataclass(frozen=True)
class Layout:
    """Where a release keeps its files and how to read them."""

    files: tuple[str, ...]
    subdirs: tuple[str, ...]
    read: Callable[[Path], Release]


def find_dir(data_dir: Path, files: tuple[str, ...], subdirs: tuple[str, ...], source: str) -> Path:
    """``data_dir`` or one of its ``subdirs`` that holds all ``files``; else ValueError."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise ValueError(
            f"data_dir {data_dir} does not exist or is not a folder; source={source!r} expects "
            f"a folder holding {', '.join(files)}. Set data.data_dir to it."
        )
    for d in (data_dir, *(data_dir / s for s in subdirs)):
        if all((d / f).is_file() for f in files):
            return d
    missing = [f for f in files if not (data_dir / f).is_file()]
    found = sorted(p.name for p in data_dir.iterdir())[:20]
    raise ValueError(
        f"data_dir {data_dir} lacks {', '.join(missing)} for source={source!r}: expected "
        f"{', '.join(files)} there (or in a subfolder {' / '.join(subdirs)}); found {found}. "
        f"Point data.data_dir at the folder that holds them."
    )


def age_group(age: int) -> str:
    """The ML-1M age group of an age in years."""
    for lo, name in reversed(list(AGE_GROUPS.items())):
        if age >= lo:
            return name
    return AGE_GROUPS[1]


def _lines(path: Path, sep: str, min_fields: int) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of each non-empty line of a latin-1 side file."""
    out = []
    text = path.read_bytes().decode("latin-1")
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(sep)
        if len(fields) < min_fields:
            raise ValueError(
                f"{path}: line {n} has {len(fields)} {sep!r}-separated fields, expected at least "
                f"{min_fields}: {line[:80]!r}. Fix or remove that line."
            )
        out.append((n, fields))
    if not out:
        raise ValueError(f"{path}: the file is empty; expected one record per line.")
    return out


def _int(path: Path, n: int, value: str, what: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError(
            f"{path}: line {n} has {value!r} as {what}; expected an integer."
        ) from None


def _ratings(path: Path, sep: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cols, where = read_delimited(path, ["user_id", "item_id", "rating", "timestamp"], sep)
    label = str(path)
    return (
        to_ids(cols["user_id"], "user_id", label, where),
        to_ids(cols["item_id"], "item_id", label, where),
        to_timestamps(cols["timestamp"], "timestamp", label, where),
    )


def _records(path: Path, sep: str, min_fields: int, parse: Callable[..., tuple]) -> list[tuple]:
    """``parse(path, line number, fields)`` of each line of a side file."""
    return [parse(path, n, f) for n, f in _lines(path, sep, min_fields)]


def _item_table(records: list[tuple]) -> ItemTable:
    """From ``(movie id, title, "|"-separated genres)`` records."""
    keys, titles, tokens = zip(*records)
    return ItemTable(np.array(keys, dtype=np.int64), np.array(titles), np.array(tokens))


def _user_table(records: list[tuple], occupations: list[str]) -> UserTable:
    """From ``(user id, gender, age group, occupation)`` records."""
    keys, gender, age, occ = zip(*records)
    return UserTable(
        np.array(keys, dtype=np.int64),
        {"gender": np.array(gender), "age": np.array(age), "occupation": np.array(occ)},
        {"gender": GENDERS, "age": list(AGE_GROUPS.values()), "occupation": occupations},
    )


# --------------------------------------------------------------------------- ML-100K


def _genres_100k(d: Path) -> list[str]:
    """The genre names of ``u.genre`` when it lists as many as expected, else the defaults."""
    if not (d / "u.genre").is_file():
        return ML100K_GENRES
    named = [f[0] for _, f in _lines(d / "u.genre", "|", 2)]
    return named if len(named) == len(ML100K_GENRES) else ML100K_GENRES


def _item_100k(genres: list[str]) -> Callable[[Path, int, list[str]], tuple[int, str, str]]:
    def parse(path: Path, n: int, f: list[str]) -> tuple[int, str, str]:
        key = _int(path, n, f[0], "the movie id")
        flags = f[5 : 5 + len(genres)]
        return key, f[1], "|".join(g for g, x in zip(genres, flags) if x.strip() == "1")

    return parse


def _user_100k(path: Path, n: int, f: list[str]) -> tuple[int, str, str, str]:
    key = _int(path, n, f[0], "the user id")
    return key, f[2].strip(), age_group(_int(path, n, f[1], "the age")), f[3].strip()


def read_movielens_100k(d: Path) -> Release:
    """``u.data``, ``u.item``, ``u.user`` and, when present, ``u.genre`` and ``u.occupation``."""
    rows = _ratings(d / "u.data", "\t")
    genres = _genres_100k(d)
    items = _item_table(_records(d / "u.item", "|", 5 + len(genres), _item_100k(genres)))
    occupations = []
    if (d / "u.occupation").is_file():
        occupations = [f[0].strip() for _, f in _lines(d / "u.occupation", "|", 1)]
    users = _user_table(_records(d / "u.user", "|", 4, _user_100k), occupations)
    return Release(d / "u.data", rows, items, users, genres)


# --------------------------------------------------------------------------- ML-1M


def _item_1m(path: Path, n: int, f: list[str]) -> tuple[int, str, str]:
    return _int(path, n, f[0], "the movie id"), "::".join(f[1:-1]), f[-1].strip()


def _user_1m(path: Path, n: int, f: list[str]) -> tuple[int, str, str, str]:
    key = _int(path, n, f[0], "the user id")
    a = _int(path, n, f[2], "the age group")
    o = _int(path, n, f[3], "the occupation")
    occupation = ML1M_OCCUPATIONS[o] if 0 <= o < len(ML1M_OCCUPATIONS) else str(o)
    return key, f[1].strip(), AGE_GROUPS.get(a, age_group(a)), occupation


def read_movielens_1m(d: Path) -> Release:
    """``ratings.dat``, ``movies.dat`` and ``users.dat``."""
    rows = _ratings(d / "ratings.dat", "::")
    items = _item_table(_records(d / "movies.dat", "::", 3, _item_1m))
    users = _user_table(_records(d / "users.dat", "::", 4, _user_1m), ML1M_OCCUPATIONS)
    return Release(d / "ratings.dat", rows, items, users, ML1M_GENRES)


# --------------------------------------------------------------------------- loading

RELEASES = {
    "movielens-100k": Layout(ML100K_FILES, ("ml-100k",), read_movielens_100k),
    "movielens-1m": Layout(ML1M_FILES, ("ml-1m", "ml-1m-partial"), read_movielens_1m),
}


def release_files(source: str, data_dir: Path) -> list[Path]:
    """The files of ``source`` (a key of ``RELEASES``), in ``data_dir`` or a subfolder."""
    layout = RELEASES[source]
    d = find_dir(data_dir, layout.files, layout.subdirs, source)
    return [d / f for f in layout.files]


def load_movielens(
    source: str,
    data_dir: Path,
    *,
    fingerprint: str,
    max_history: int,
    drop_short_users: bool,
    holdout: str = "test",
) -> Dataset:
    """The data set of release ``source`` (``"movielens-100k"`` / ``"movielens-1m"``) found in
    ``data_dir`` or its subfolder (``ml-100k/``; ``ml-1m/``, ``ml-1m-partial/``)."""
    release = RELEASES[source].read(release_files(source, data_dir)[0].parent)
    return build_dataset(
        *release.rows,
        origin=str(release.ratings),
        fingerprint=fingerprint,
        max_history=max_history,
        drop_short_users=drop_short_users,
        holdout=holdout,
        user_table=release.users,
        item_table=release.items,
        item_vocab_order=release.genres,
    )
