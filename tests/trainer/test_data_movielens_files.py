"""trainer.data.movielens on tiny hand-made ML-100K and ML-1M folders (no real data needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.data import DataConfig, load_dataset
from trainer.data.movielens import (
    ML1M_GENRES,
    ML100K_GENRES,
    RELEASES,
    read_movielens_1m,
    read_movielens_100k,
    release_files,
)

# user 1 rates 10, 20, 30, 20 (training target: 20); user 2 rates 20 then 10; user 3 none
RATINGS = [(1, 10, 5, 100), (2, 20, 5, 50), (1, 20, 3, 101), (1, 30, 4, 102), (2, 10, 2, 51),
           (1, 20, 1, 103)]  # fmt: skip
ORDER = [20, 10, 30]  # 20 is the only training target; then 10 (2 ratings), 30 (1)


def _flags(*genres: str) -> str:
    return "|".join("1" if g in genres else "0" for g in ML100K_GENRES)


def write_100k(d: Path, *, occupation_file: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    items = [
        f"10|Misérables, Les (1995)|01-Jan-1995||http://x|{_flags('Action', 'Comedy')}",
        f"20|Beta (1991)|01-Jan-1991||http://x|{_flags('unknown')}",
        f"30|Gamma (1992)|01-Jan-1992||http://x|{_flags('Drama')}",
        f"40|Unrated (1993)|01-Jan-1993||http://x|{_flags('Western')}",
    ]
    (d / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    (d / "u.user").write_text("1|24|M|technician|85711\n2|60|F|writer|12345\n3|17|F|student|0\n")
    if occupation_file:
        (d / "u.occupation").write_text("technician\nwriter\nstudent\n")
    return d


def write_1m(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS))
    movies = ["10::Alpha::Part (1990)::Action|Comedy", "20::Beta (1991)::Drama",
              "30::Gamma (1992)::Sci-Fi|War"]  # fmt: skip
    (d / "movies.dat").write_text("\n".join(movies) + "\n")
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::30::99::1\n")
    return d


def _bag(ds, item: int) -> list[str]:
    return [
        ds.items.feature_vocab[t] for t in ds.items.features[ds.items.lookup([item])[0]] if t >= 0
    ]


def _user(ds, user: int, name: str) -> str:
    return ds.user_feature_vocab[name][ds.user_features[name][ds.user_lookup([user])[0]]]


def test_release_files_finds_the_folder_or_a_subfolder(tmp_path):
    write_100k(tmp_path / "ml-100k")
    write_1m(tmp_path / "ml-1m-partial")
    files = release_files("movielens-100k", tmp_path)
    assert files == [tmp_path / "ml-100k" / f for f in RELEASES["movielens-100k"].files]
    assert release_files("movielens-1m", tmp_path / "ml-1m-partial")[0].name == "ratings.dat"
    with pytest.raises(ValueError, match=r"lacks ratings\.dat, movies\.dat, users\.dat"):
        release_files("movielens-1m", tmp_path / "ml-100k")


def test_read_100k_rows_and_tables(tmp_path):
    d = write_100k(tmp_path)
    release = read_movielens_100k(d)
    assert release.ratings == d / "u.data" and release.genres == ML100K_GENRES
    users, items, ts = release.rows
    assert users.tolist() == [r[0] for r in RATINGS] and ts.tolist() == [r[3] for r in RATINGS]
    assert items.tolist() == [r[1] for r in RATINGS]
    assert release.items.keys.tolist() == [10, 20, 30, 40]
    assert release.items.tokens.tolist() == ["Action|Comedy", "unknown", "Drama", "Western"]
    assert release.items.titles[0] == "Misérables, Les (1995)"  # latin-1
    assert release.users.columns["age"].tolist() == ["18-24", "56+", "under 18"]
    assert release.users.vocab_order["occupation"] == ["technician", "writer", "student"]


def test_load_100k(tmp_path):
    ds = load_dataset(DataConfig(source="movielens-100k", data_dir=write_100k(tmp_path)))
    assert ds.name == str(tmp_path / "u.data") and len(ds.fingerprint) == 64
    assert ds.users.tolist() == [1, 2] and ds.items.original_ids.tolist() == ORDER
    assert ds.items.popularity.tolist() == [1, 0, 0]
    assert ds.items.titles == ["Beta (1991)", "Misérables, Les (1995)", "Gamma (1992)"]
    assert ds.items.feature_vocab == ML100K_GENRES
    assert _bag(ds, 10) == ["Action", "Comedy"] and _bag(ds, 20) == ["unknown"]
    assert ds.user_feature_vocab["occupation"] == ["<unk>", "technician", "writer", "student"]
    assert [_user(ds, 1, n) for n in ("gender", "age", "occupation")] == [
        "M",
        "18-24",
        "technician",
    ]
    assert [_user(ds, 2, n) for n in ("gender", "age", "occupation")] == ["F", "56+", "writer"]


def test_100k_without_an_occupation_file_orders_occupations_by_name(tmp_path):
    ds = load_dataset(
        DataConfig(source="movielens-100k", data_dir=write_100k(tmp_path, occupation_file=False))
    )
    assert ds.user_feature_vocab["occupation"] == ["<unk>", "technician", "writer"]


def test_load_1m_titles_with_separators_and_unknown_codes(tmp_path):
    write_1m(tmp_path / "ml-1m")
    ds = load_dataset(DataConfig(source="movielens-1m", data_dir=tmp_path))
    assert ds.name == str(tmp_path / "ml-1m" / "ratings.dat")
    assert ds.items.original_ids.tolist() == ORDER and ds.items.feature_vocab == ML1M_GENRES
    assert ds.items.titles == ["Beta (1991)", "Alpha::Part (1990)", "Gamma (1992)"]
    assert _bag(ds, 30) == ["Sci-Fi", "War"] and _bag(ds, 10) == ["Action", "Comedy"]
    assert [_user(ds, 1, n) for n in ("gender", "age", "occupation")] == [
        "F",
        "under 18",
        "K-12 student",
    ]
    # age 30 is no ML-1M group code: bucketed as an age; occupation 99 is kept as its number
    assert [_user(ds, 2, n) for n in ("gender", "age", "occupation")] == ["M", "25-34", "99"]
    np.testing.assert_array_equal(ds.test_positions, [3, 5])


def test_a_bad_side_file_line_is_named(tmp_path):
    d = write_1m(tmp_path)
    (d / "users.dat").write_text("1::F::1::10::48067\nx::M::1::1::1\n")
    with pytest.raises(ValueError, match=r"users\.dat: line 2 has 'x' as the user id"):
        read_movielens_1m(d)
    (d / "movies.dat").write_text("10::Alpha\n")
    with pytest.raises(ValueError, match=r"movies\.dat: line 1 has 2 '::'-separated fields"):
        read_movielens_1m(d)
