"""trainer.data on a hand-made interactions file (CSV, TSV and parquet)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.data import (
    DataConfig,
    Interactions,
    history_batch,
    history_sets,
    load_dataset,
    split_positions,
)

# File order matters: user 1 has two rows at t=100 (items 10 then 20) that must keep it.
ROWS = [
    # user, item, ts, gender, genres
    (1, 10, 100, "M", "a|b"),
    (2, 20, 50, "F", "b"),
    (1, 20, 100, "M", "a|b"),
    (1, 30, 90, "M", "c"),
    (2, 10, 60, "F", "b"),
    (3, 30, 10, "", "c"),
    (3, 20, 20, "", "b"),
    (1, 40, 200, "M", "d"),
    (2, 30, 70, "F", "b"),
    (4, 40, 1, "F", "d"),
    (4, 40, 2, "F", "d"),
    (4, 30, 3, "F", "c"),
    (4, 40, 4, "F", "d"),
    (4, 30, 5, "F", "c"),
    (4, 10, 6, "F", "a|b"),
]
HEADER = ("user_id", "item_id", "timestamp", "gender", "genres")
# Training targets are items 10 (user 1) and 40, 30, 40 (user 4): 40 -> 0, then 10 and 30 tie at
# one (id order), then 20 (never a training target) last.
INTERNAL = {40: 0, 10: 1, 30: 2, 20: 3}
SEQ_ORIGINAL = [30, 10, 20, 40, 20, 10, 30, 30, 20, 40, 40, 30, 40, 30, 10]


def write(path: Path, rows=ROWS, header=HEADER) -> Path:
    suffix = path.suffix
    if suffix == ".parquet":
        cols = list(zip(*rows)) if rows else [[] for _ in header]
        types = [pa.int64(), pa.int64(), pa.int64(), pa.string(), pa.string()][: len(header)]
        table = pa.table({h: pa.array(list(c), t) for h, c, t in zip(header, cols, types)})
        pq.write_table(table, path)
    else:
        sep = "," if suffix == ".csv" else "\t"
        lines = [sep.join(header)] + [sep.join(str(v) for v in r) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    return path


def raw(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def cfg_for(path: Path, **kw) -> DataConfig:
    return DataConfig(
        source="interactions",
        path=path,
        user_feature_cols=kw.pop("user_feature_cols", ["gender"]),
        item_feature_cols=kw.pop("item_feature_cols", ["genres"]),
        **kw,
    )


def load_file(path: Path, **kw):
    return load_dataset(DataConfig(source="interactions", path=path, **kw))


def load_error(path: Path, match: str, **kw) -> str:
    """The message of the ValueError (matching ``match``) that loading ``path`` raises."""
    with pytest.raises(ValueError, match=match) as err:
        load_file(path, **kw)
    return str(err.value)


@pytest.fixture(params=[".csv", ".tsv", ".parquet"])
def tiny(request, tmp_path):
    return load_dataset(cfg_for(write(tmp_path / f"tiny{request.param}")))


def test_split_protocol_exact_positions(tiny):
    assert tiny.num_users == 4 and tiny.num_items == 4
    np.testing.assert_array_equal(tiny.seq.offsets, [0, 4, 7, 9, 15])
    np.testing.assert_array_equal(tiny.train_positions, [1, 10, 11, 12])
    np.testing.assert_array_equal(tiny.valid_positions, [2, 5, 13])  # user 3 (2 rows): none
    np.testing.assert_array_equal(tiny.test_positions, [3, 6, 8, 14])
    for arr in (tiny.train_positions, tiny.seq.items, tiny.seq.offsets, tiny.seq.timestamps):
        assert arr.dtype == np.int64
    assert tiny.t_max == 100


def test_time_order_keeps_file_order_for_ties(tiny):
    expected = [INTERNAL[i] for i in SEQ_ORIGINAL]
    np.testing.assert_array_equal(tiny.seq.items, expected)
    np.testing.assert_array_equal(tiny.seq.timestamps[:4], [90, 100, 100, 200])
    # the two t=100 rows of user 1: item 10 (earlier in the file) before item 20
    assert tiny.items.original_ids[tiny.seq.items[1]] == 10
    assert tiny.items.original_ids[tiny.seq.items[2]] == 20


def test_items_reindexed_by_training_frequency(tiny):
    np.testing.assert_array_equal(tiny.items.original_ids, [40, 10, 30, 20])
    assert tiny.items.original_ids.dtype == np.int64
    np.testing.assert_array_equal(tiny.items.popularity, [2, 1, 1, 0])
    counted = np.bincount(tiny.seq.items[tiny.train_positions], minlength=tiny.num_items)
    np.testing.assert_array_equal(tiny.items.popularity, counted)


def test_lookup_accepts_ints_and_strings_and_gives_minus_one_for_unknown(tiny):
    np.testing.assert_array_equal(tiny.items.lookup([10, "10", 99, "x", 40]), [1, 1, -1, -1, 0])
    np.testing.assert_array_equal(tiny.items.lookup(np.array([20, 30])), [3, 2])
    np.testing.assert_array_equal(tiny.user_lookup([4, "2", 7, "1"]), [3, 1, -1, 0])
    np.testing.assert_array_equal(tiny.users, [1, 2, 3, 4])


def test_features(tiny):
    assert tiny.user_feature_vocab == {"gender": ["<unk>", "F", "M"]}
    np.testing.assert_array_equal(tiny.user_features["gender"], [2, 1, 0, 1])
    assert tiny.items.feature_vocab == ["a", "b", "c", "d"]
    # internal order 40, 10, 30, 20 -> d, a|b, c, b
    np.testing.assert_array_equal(tiny.items.features, [[3, -1], [0, 1], [2, -1], [1, -1]])
    assert tiny.items.titles is None


def test_history_batch_contents_padding_truncation(tiny):
    hist, lengths = history_batch(tiny.seq, np.array([3, 14, 9, 8]), max_len=3)
    np.testing.assert_array_equal(hist, [[2, 1, 3], [2, 0, 2], [-1, -1, -1], [-1, -1, 2]])
    np.testing.assert_array_equal(lengths, [3, 3, 0, 1])
    assert hist.dtype == np.int64 and lengths.dtype == np.int64
    hist, lengths = history_batch(tiny.seq, [14], max_len=8)
    np.testing.assert_array_equal(hist, [[-1, -1, -1, 0, 0, 2, 0, 2]])
    np.testing.assert_array_equal(lengths, [5])


def test_history_sets(tiny):
    sets = history_sets(tiny.seq, [3, 14, 9])
    np.testing.assert_array_equal(sets.offsets, [0, 3, 8, 8])
    np.testing.assert_array_equal(sets.items, [2, 1, 3, 0, 0, 2, 0, 2])
    np.testing.assert_array_equal(sets.rows(1, 3).offsets, [0, 5, 5])


def test_history_batch_matches_a_loop_on_random_sequences():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 12, 30)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = rng.integers(0, 50, offsets[-1]).astype(np.int64)
    seq = Interactions(offsets, items, np.arange(offsets[-1], dtype=np.int64))
    positions = rng.integers(0, offsets[-1], 40)
    hist, lens = history_batch(seq, positions, max_len=5)
    sets = history_sets(seq, positions)
    for row, p in enumerate(positions):
        start = offsets[np.searchsorted(offsets, p, side="right") - 1]
        before = items[start:p]
        recent = before[-5:]
        assert lens[row] == len(recent)
        np.testing.assert_array_equal(hist[row], [-1] * (5 - len(recent)) + list(recent))
        np.testing.assert_array_equal(sets.row(row), before)


def test_split_positions_all_sizes():
    train, valid, test = split_positions(np.array([0, 2, 5, 9], dtype=np.int64))
    np.testing.assert_array_equal(test, [1, 4, 8])
    np.testing.assert_array_equal(valid, [3, 7])
    np.testing.assert_array_equal(train, [6])  # n=3: none; n=4: the second position only


def test_history_batch_rejects_bad_positions(tiny):
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 15\)"):
        history_batch(tiny.seq, [15], 3)
    with pytest.raises(ValueError, match="max_len"):
        history_batch(tiny.seq, [1], 0)


def test_string_ids(tmp_path):
    rows = [("alice", "x", 1), ("alice", "y", 2), ("bob", "y", 1), ("bob", "10", 3)]
    path = write(tmp_path / "s.csv", rows, HEADER[:3])
    ds = load_file(path)
    assert ds.items.original_ids.dtype == object and ds.users.dtype == object
    assert list(ds.users) == ["alice", "bob"]
    # no training targets: order by total count (y: 2), then id as text ("10" < "x")
    np.testing.assert_array_equal(ds.items.lookup(["y", "x", 10, "zz"]), [0, 2, 1, -1])
    np.testing.assert_array_equal(ds.user_lookup(["bob", "carol"]), [1, -1])


def test_time_col_none_uses_file_order(tmp_path):
    rows = [(1, 5, 9), (1, 6, 1), (1, 7, 5)]
    path = write(tmp_path / "f.csv", rows, HEADER[:3])
    ds = load_file(path, time_col=None)
    np.testing.assert_array_equal(ds.items.original_ids[ds.seq.items], [5, 6, 7])


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_user_with_one_interaction_fails_naming_user_and_file(tmp_path, suffix):
    path = write(tmp_path / f"short{suffix}", [*ROWS, (5, 10, 7, "M", "a")])
    with pytest.raises(ValueError) as err:
        load_dataset(cfg_for(path))
    msg = str(err.value)
    assert "user 5" in msg and str(path) in msg and "drop_short_users=True" in msg


def test_drop_short_users(tmp_path, caplog):
    path = write(tmp_path / "short.csv", [*ROWS, (5, 99, 7, "M", "z"), (6, 10, 1, "F", "a")])
    with caplog.at_level(logging.INFO, logger="trainer.data"):
        ds = load_dataset(cfg_for(path, drop_short_users=True))
    assert "dropped 2 user(s)" in caplog.text
    np.testing.assert_array_equal(ds.users, [1, 2, 3, 4])
    assert ds.num_items == 4 and ds.items.lookup([99])[0] == -1  # only user 5 had item 99
    np.testing.assert_array_equal(ds.test_positions, [3, 6, 8, 14])


def test_missing_column_lists_found_columns(tmp_path):
    for suffix in (".csv", ".parquet"):
        msg = load_error(write(tmp_path / f"m{suffix}"), "missing column", item_col="movie")
        assert "'movie'" in msg and "'item_id'" in msg
        assert "'timestamp'" in msg


def test_non_numeric_timestamp_names_the_line(tmp_path):
    rows = list(ROWS)
    rows[2] = (1, 20, "yesterday", "M", "a|b")  # data row 3 = line 4 (after the header)
    path = write(tmp_path / "t.csv", rows)
    with pytest.raises(ValueError, match="line 4") as err:
        load_dataset(cfg_for(path))
    assert "'yesterday'" in str(err.value) and str(path) in str(err.value)


def test_fractional_timestamps_are_floored(tmp_path):
    rows = [(1, 5, "1.5"), (1, 6, "2e0"), (1, 7, "0.2")]
    ds = load_file(write(tmp_path / "f.csv", rows, HEADER[:3]))
    np.testing.assert_array_equal(ds.seq.timestamps, [0, 1, 2])


def test_wrong_field_count_names_the_line(tmp_path):
    load_error(
        raw(tmp_path / "bad.csv", "user_id,item_id,timestamp\n1,2,3\n1,3\n1,4,5\n"), "line 3"
    )


def test_empty_files(tmp_path):
    empty = raw(tmp_path / "empty.csv", "")
    assert str(empty) in load_error(empty, "empty")
    load_error(raw(tmp_path / "header.tsv", "user_id\titem_id\ttimestamp\n"), "no data rows")
    load_error(write(tmp_path / "empty.parquet", [], HEADER), "no rows")


def test_unreadable_parquet_and_unknown_suffix(tmp_path):
    bad = raw(tmp_path / "bad.parquet", "this is not parquet")
    assert str(bad) in load_error(bad, "cannot read as parquet")
    load_error(raw(tmp_path / "data.json", "{}"), r"\.csv, \.tsv")


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="needs data_dir"):
        DataConfig(source="movielens-100k")
    with pytest.raises(ValueError, match="needs path"):
        DataConfig(source="interactions")
    with pytest.raises(ValueError, match="extra"):
        DataConfig(sources="synthetic")
    with pytest.raises(ValueError, match=r"u\.data, u\.item, u\.user"):
        load_dataset(DataConfig(source="movielens-100k", data_dir=tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"ratings\.dat"):
        load_dataset(DataConfig(source="movielens-1m", data_dir=tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset(DataConfig(source="interactions", path=tmp_path / "nope.csv"))


def test_fingerprint_tracks_bytes_and_config_not_location(tmp_path):
    a = write(tmp_path / "a.csv")
    (tmp_path / "sub").mkdir()
    b = write(tmp_path / "sub" / "a.csv")
    fa = load_dataset(cfg_for(a)).fingerprint
    assert re.fullmatch("[0-9a-f]{64}", fa)
    # sha256 of a version tag, the config without its paths, then each file's name and bytes
    settings = cfg_for(a).model_dump(mode="json", exclude={"data_dir", "path", "synthetic"})
    config = json.dumps(settings, sort_keys=True).encode()
    digest = hashlib.sha256(b"shardrec-data-v1\0" + config + b"\0a.csv\0" + a.read_bytes())
    assert fa == digest.hexdigest()
    assert load_dataset(cfg_for(b)).fingerprint == fa
    assert load_dataset(cfg_for(a, max_history=7)).fingerprint != fa
    b.write_text(b.read_text().replace("200", "201"))
    assert load_dataset(cfg_for(b)).fingerprint != fa


def test_several_item_feature_columns_are_prefixed(tmp_path):
    header = ("user_id", "item_id", "timestamp", "genres", "lang")
    rows = [(1, 5, 1, "a|b", "en"), (1, 6, 2, "b", "fr"), (1, 7, 3, "", "en")]
    path = write(tmp_path / "f.csv", rows, header)
    ds = load_file(path, item_feature_cols=["genres", "lang"])
    assert ds.items.feature_vocab == ["genres:a", "genres:b", "lang:en", "lang:fr"]
    row = ds.items.features[ds.items.lookup([5])[0]]
    assert [ds.items.feature_vocab[t] for t in row if t >= 0] == ["genres:a", "genres:b", "lang:en"]
