"""service.index: exact vs NumPy, approximate recall, exclusion, persistence, input checks,
and the MIPS transform against its NumPy reference."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.index import (
    IndexParams,
    ItemIndex,
    RecallReport,
    auto_nlist,
    build_index,
    load_index,
    measure_recall,
    save_index,
)
from service.index.backends import IVFBackend
from service.index.mips import mips_items, mips_queries, squared_norms
from tests.service.helpers import Items, brute_force, make_items

# Small graphs / lists so that the suite stays fast; one FAISS thread (2 shared cores).
HNSW_IP = IndexParams(hnsw_m=16, ef_construction=100, ef_search=64, num_threads=1)
HNSW_L2 = IndexParams(hnsw_m=16, ef_construction=100, ef_search=64, hnsw_metric="l2", num_threads=1)
IVF = IndexParams(nprobe=8, num_threads=1)
KINDS = [
    pytest.param("exact", IndexParams(num_threads=1), id="exact"),
    pytest.param("hnsw", HNSW_IP, id="hnsw-ip"),
    pytest.param("hnsw", HNSW_L2, id="hnsw-l2"),
    pytest.param("ivf", IVF, id="ivf"),
]


@pytest.fixture(scope="module")
def exact(items: Items) -> ItemIndex:
    return build_index("exact", items.vectors, items.bias, IndexParams(num_threads=1))


@pytest.fixture(scope="module")
def built(items: Items) -> dict[str, ItemIndex]:
    return {
        "hnsw-ip": build_index("hnsw", items.vectors, items.bias, HNSW_IP),
        "hnsw-l2": build_index("hnsw", items.vectors, items.bias, HNSW_L2),
        "ivf": build_index("ivf", items.vectors, items.bias, IVF),
    }


def assert_exact_scores(index: ItemIndex, items: Items, queries, scores, ids) -> None:
    """Every returned score is the float64 u·w + b of its id; rows sorted descending."""
    valid = ids >= 0
    ref = np.einsum(
        "nkd,nd->nk",
        items.vectors.astype(np.float64)[np.where(valid, ids, 0)],
        queries.astype(np.float64),
    )
    ref += items.bias.astype(np.float64)[np.where(valid, ids, 0)]
    np.testing.assert_allclose(scores[valid], ref[valid], rtol=1e-6, atol=1e-5)
    assert np.all(np.diff(np.where(valid, scores, -1e30), axis=1) <= 0)
    assert np.all(np.diff(valid.astype(np.int8), axis=1) <= 0)  # padding only at the end
    assert np.all(scores[~valid] == -np.inf)


# ---------------------------------------------------------------------- exact


def test_exact_matches_numpy_brute_force(items: Items, exact: ItemIndex) -> None:
    scores, ids = exact.search(items.queries, 10)
    ref_scores, ref_ids = brute_force(items, items.queries, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores.shape == ids.shape == (len(items.queries), 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=1e-5)
    assert exact.is_exact and exact.kind == "exact" and exact.ntotal == len(items.vectors)


def test_exact_with_strongly_varying_norms() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((500, 8)) * rng.uniform(0.01, 50.0, (500, 1))
    data = Items(
        vectors.astype(np.float32),
        (5 * rng.standard_normal(500)).astype(np.float32),
        rng.standard_normal((20, 8)).astype(np.float32),
    )
    scores, ids = build_index("exact", data.vectors, data.bias).search(data.queries, 7)
    ref_scores, ref_ids = brute_force(data, data.queries, 7)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        *KINDS[:2],
        pytest.param(
            "hnsw",
            HNSW_L2,
            id="hnsw-l2",
            marks=pytest.mark.xfail(
                strict=True,
                reason="known weakness of the MIPS-to-L2 graph: the dominant item is an L2 "
                "outlier that no graph node links to (why hnsw_metric defaults to 'ip')",
            ),
        ),
        KINDS[3],
    ],
)
def test_bias_takes_part_in_the_score(kind: str, params: IndexParams) -> None:
    data = make_items(1, num_items=800)
    vectors, bias = data.vectors.copy(), data.bias.copy()
    vectors[123] = 0.0
    bias[123] = 1e3  # a zero vector that beats every item on its bias alone
    index = build_index(kind, vectors, bias, params)
    scores, ids = index.search(data.queries[:20], 5)
    assert np.all(ids[:, 0] == 123)
    np.testing.assert_allclose(scores[:, 0], 1e3, rtol=1e-6)


@pytest.mark.parametrize(("kind", "params"), KINDS)
def test_returned_scores_are_exact_inner_products(
    items: Items, kind: str, params: IndexParams, built: dict[str, ItemIndex], exact: ItemIndex
) -> None:
    name = {"exact": "exact", "ivf": "ivf"}.get(kind, f"hnsw-{params.hnsw_metric}")
    index = exact if kind == "exact" else built[name]
    scores, ids = index.search(items.queries[:50], 20)
    assert np.all(ids >= 0)
    assert_exact_scores(index, items, items.queries[:50], scores, ids)


# ---------------------------------------------------------------------- recall


@pytest.mark.parametrize(("name", "threshold"), [("hnsw-ip", 0.95), ("hnsw-l2", 0.9), ("ivf", 0.9)])
def test_approximate_recall_above_threshold(
    items: Items, built: dict[str, ItemIndex], exact: ItemIndex, name: str, threshold: float
) -> None:
    index = built[name]
    assert not index.is_exact
    report = measure_recall(index, exact, items.queries, 10)
    assert report.recall >= threshold, f"{name} recall@10 = {report.recall:.3f} < {threshold}"
    assert (report.k, report.num_queries) == (10, len(items.queries))


def test_measure_recall_returns_a_report_and_checks(items: Items, exact: ItemIndex) -> None:
    assert measure_recall(exact, exact, items.queries[:10], 5).recall == 1.0
    index = build_index("ivf", items.vectors, items.bias, IVF)
    report = measure_recall(index, exact, items.queries[:50], 10)
    assert report == RecallReport(recall=report.recall, k=10, num_queries=50)
    assert 0.0 < report.recall <= 1.0
    small = build_index("exact", items.vectors[:100], items.bias[:100])
    with pytest.raises(ValueError, match="same items"):
        measure_recall(small, exact, items.queries, 10)


def test_ivf_auto_nlist_and_nprobe_clipped(items: Items) -> None:
    index = build_index("ivf", items.vectors, items.bias, IndexParams(nprobe=10_000))
    ivf = index.backend
    assert isinstance(ivf, IVFBackend)
    assert ivf.nlist == auto_nlist(len(items.vectors)) == 76
    assert ivf.nprobe == ivf.nlist  # probing every list is exhaustive: exact results
    _, ids = index.search(items.queries[:20], 10)
    np.testing.assert_array_equal(ids, brute_force(items, items.queries[:20], 10)[1])


# ---------------------------------------------------------------------- exclusion


@pytest.mark.parametrize(("kind", "params"), KINDS)
def test_exclusion_never_returns_excluded_and_fills_k(
    items: Items, kind: str, params: IndexParams
) -> None:
    index = build_index(kind, items.vectors, items.bias, params)
    queries = items.queries[:6]
    _, top = brute_force(items, queries, 600)
    exclude = [
        [],
        top[1, :5].tolist(),  # the true top 5
        top[2, :500].tolist(),  # many: the whole true top 500
        list(range(0, 3000, 2)),  # half of all items
        [*top[4, :50].tolist(), -7, 10**9],  # out-of-range ids are ignored
        list(range(3000)),  # everything
    ]
    scores, ids = index.search(queries, 10, exclude=exclude)
    for row, excluded in enumerate(exclude):
        assert not set(ids[row].tolist()) & set(excluded), row
    assert np.all(ids[:5] >= 0)  # k results whenever k items remain
    assert np.all(ids[5] == -1) and np.all(scores[5] == -np.inf)
    assert_exact_scores(index, items, queries, scores, ids)
    cleaned = [[i for i in e if 0 <= i < 3000] for e in exclude]
    _, ref_ids = brute_force(items, queries, 10, cleaned)
    if index.is_exact:
        np.testing.assert_array_equal(ids, ref_ids)
    else:
        # Rows whose exclusions do not crowd the top (none, the top 5, every other item) stay
        # accurate; rows 2 and 4 ask for ranks 501-510 / 51-60, where the graph or the lists
        # are less accurate.
        for row in (0, 1, 3):
            assert len(set(ids[row].tolist()) & set(ref_ids[row].tolist())) >= 9, row
    # A row's answer does not depend on the other rows of the batch.
    for row in range(6):
        alone_scores, alone_ids = index.search(queries[row : row + 1], 10, exclude=[exclude[row]])
        np.testing.assert_array_equal(alone_ids[0], ids[row])
        np.testing.assert_array_equal(alone_scores[0], scores[row])


def test_a_long_exclusion_list_does_not_slow_the_other_rows(items: Items) -> None:
    """Rows fetch k + their own exclusions (rounded to a power of two), not the batch maximum."""
    index = build_index("hnsw", items.vectors, items.bias, HNSW_IP)
    fetched: list[int] = []
    original = index.backend.search

    def spy(q_aug: np.ndarray, fetch: int) -> np.ndarray:
        fetched.extend([fetch] * q_aug.shape[0])
        return original(q_aug, fetch)

    index.backend.search = spy  # type: ignore[method-assign]
    exclude = [[], [1, 2, 3], list(range(1000)), []]
    index.search(items.queries[:4], 10, exclude=exclude)
    assert sorted(fetched) == [16, 16, 16, 1024]


def test_exclusion_leaving_fewer_than_k_items_pads(items: Items, exact: ItemIndex) -> None:
    keep = [5, 17, 2999]
    exclude = [[i for i in range(3000) if i not in keep]]
    scores, ids = exact.search(items.queries[:1], 5, exclude=exclude)
    assert sorted(ids[0, :3].tolist()) == keep
    assert ids[0, 3:].tolist() == [-1, -1]
    assert np.all(np.isneginf(scores[0, 3:]))


def test_k_larger_than_the_index_pads(items: Items) -> None:
    index = build_index("hnsw", items.vectors[:7], items.bias[:7], HNSW_IP)
    scores, ids = index.search(items.queries[:3], 10)
    assert np.all(np.sort(ids[:, :7], axis=1) == np.arange(7))
    assert np.all(ids[:, 7:] == -1) and np.all(np.isneginf(scores[:, 7:]))


def test_exclude_accepts_a_2d_array_and_checks_length(items: Items, exact: ItemIndex) -> None:
    excl = np.array([[0, 1], [2, 3]])
    _, ids = exact.search(items.queries[:2], 3, exclude=excl)
    assert not {0, 1} & set(ids[0].tolist()) and not {2, 3} & set(ids[1].tolist())
    with pytest.raises(ValueError, match="one id list per query: expected 2, got 1"):
        exact.search(items.queries[:2], 3, exclude=[[1]])
    with pytest.raises(ValueError, match="integer item ids"):
        exact.search(items.queries[:1], 3, exclude=[["a"]])


# ---------------------------------------------------------------------- add


def test_add_appends_ids_and_keeps_exact_scores(items: Items) -> None:
    index = ItemIndex("exact", 16)
    index.add(items.vectors[:1000], items.bias[:1000])  # empty index: builds
    index.add(items.vectors[1000:], items.bias[1000:])
    assert index.ntotal == 3000
    _, ids = index.search(items.queries[:10], 10)
    np.testing.assert_array_equal(ids, brute_force(items, items.queries[:10], 10)[1])
    assert index.matches(items.vectors, items.bias)
    assert not index.matches(items.vectors, items.bias + 1)


def test_add_beyond_the_norm_bound_asks_for_a_rebuild(items: Items) -> None:
    index = build_index("hnsw", items.vectors[:500], items.bias[:500], HNSW_L2)
    index.add(items.vectors[500:510] * 0.0, items.bias[500:510] * 0.0)
    assert index.ntotal == 510
    with pytest.raises(ValueError, match="rebuild the index"):
        index.add(items.vectors[:1] * 1e3, items.bias[:1])


# ---------------------------------------------------------------------- persistence


@pytest.mark.parametrize(("kind", "params"), KINDS)
def test_save_load_round_trip(tmp_path, items: Items, kind: str, params: IndexParams) -> None:
    index = build_index(kind, items.vectors, items.bias, params)
    recall = RecallReport(0.97, 10, 200)
    path = save_index(index, tmp_path / "index", recall)
    assert sorted(p.name for p in path.iterdir()) == ["index.faiss", "index.json"]
    meta = json.loads((path / "index.json").read_text())
    assert meta["kind"] == kind and meta["ntotal"] == 3000 and meta["dim"] == 16
    assert meta["recall"] == {"recall": 0.97, "k": 10, "num_queries": 200}

    loaded, loaded_recall = load_index(path)
    assert type(loaded.backend) is type(index.backend) and loaded.params == index.params
    assert loaded_recall == recall and loaded.fingerprint == index.fingerprint
    assert loaded.matches(items.vectors, items.bias)
    s1, i1 = index.search(items.queries[:50], 10, exclude=[[1, 2]] * 50)
    s2, i2 = loaded.search(items.queries[:50], 10, exclude=[[1, 2]] * 50)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    assert load_index(path, kind=kind)[0].kind == kind  # a loader asking for its kind accepts it


def test_load_overrides_search_params_only(tmp_path, items: Items) -> None:
    path = save_index(build_index("hnsw", items.vectors, items.bias, HNSW_IP), tmp_path / "h")
    loaded, _ = load_index(path, IndexParams(ef_search=300, hnsw_m=64, num_threads=1))
    assert loaded.params.ef_search == 300
    assert loaded.params.hnsw_m == 16  # build-time parameter kept
    loaded_ivf, _ = load_index(
        save_index(build_index("ivf", items.vectors, items.bias, IVF), tmp_path / "i"),
        IndexParams(nprobe=2),
    )
    assert isinstance(loaded_ivf.backend, IVFBackend) and loaded_ivf.backend.nprobe == 2


def test_save_replaces_existing_directory(tmp_path, items: Items) -> None:
    path = tmp_path / "index"
    save_index(build_index("exact", items.vectors[:10], items.bias[:10]), path)
    save_index(build_index("exact", items.vectors[:20], items.bias[:20]), path)
    assert load_index(path)[0].ntotal == 20
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # no temporary leftovers


def test_load_errors(tmp_path, items: Items) -> None:
    with pytest.raises(FileNotFoundError, match="build it first"):
        load_index(tmp_path / "missing")
    path = save_index(build_index("exact", items.vectors[:50], items.bias[:50]), tmp_path / "e")
    with pytest.raises(ValueError, match="holds a 'exact' index, expected 'hnsw'"):
        load_index(path, kind="hnsw")
    meta = json.loads((path / "index.json").read_text())
    meta["fingerprint"] = "0" * 64
    (path / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match the fingerprint"):
        load_index(path)
    meta["kind"] = "annoy"
    (path / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="index kind must be one of"):
        load_index(path)
    with pytest.raises(ValueError, match="cannot save an empty"):
        save_index(ItemIndex("exact", 4), tmp_path / "empty")


# ---------------------------------------------------------------------- input checks


def test_bad_queries_and_k(exact: ItemIndex, items: Items) -> None:
    q = items.queries[:2]
    with pytest.raises(ValueError, match=r"shape \[n, 16\], got \(2, 17\)"):
        exact.search(np.ones((2, 17), np.float32), 5)
    with pytest.raises(ValueError, match=r"x\[None, :\]"):
        exact.search(q[0], 5)
    for bad_k in (0, -3):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            exact.search(q, bad_k)
    for bad_k in (2.5, True, "5"):
        with pytest.raises(TypeError, match="k must be an int"):
            exact.search(q, bad_k)
    for bad in (np.nan, np.inf, 1e39):
        broken = q.astype(np.float64)
        broken[1, 3] = bad
        with pytest.raises(ValueError, match="must be finite"):
            exact.search(broken, 5)
    with pytest.raises(TypeError, match="real-valued"):
        exact.search(np.array([["a"] * 16]), 5)
    empty_scores, empty_ids = exact.search(np.empty((0, 16), np.float32), 4)
    assert empty_scores.shape == empty_ids.shape == (0, 4)


def test_bad_items_and_params(items: Items) -> None:
    broken = items.vectors[:100].copy()
    broken[7, 0] = np.nan
    with pytest.raises(ValueError, match="item_vectors must be finite"):
        build_index("hnsw", broken, items.bias[:100])
    bias = items.bias[:100].copy()
    bias[3] = np.inf
    with pytest.raises(ValueError, match="item_bias must be finite"):
        build_index("exact", items.vectors[:100], bias)
    with pytest.raises(ValueError, match=r"item_bias must have shape \[100\]"):
        build_index("exact", items.vectors[:100], items.bias[:99])
    with pytest.raises(ValueError, match=r"2-D array \[N, d\]"):
        build_index("exact", items.vectors[0], None)
    with pytest.raises(ValueError, match="at least one item"):
        build_index("exact", np.empty((0, 16), np.float32))
    with pytest.raises(ValueError, match="index kind must be one of"):
        build_index("lsh", items.vectors)
    with pytest.raises(ValueError, match="nlist must be <= the number of items"):
        build_index("ivf", items.vectors[:50], params={"nlist": 64})
    with pytest.raises(ValueError, match=r"efSearch\n  Extra inputs are not permitted"):
        build_index("hnsw", items.vectors, params={"efSearch": 10})
    with pytest.raises(ValueError, match=r"hnsw_metric\n  Input should be 'ip' or 'l2'"):
        IndexParams(hnsw_metric="cosine")
    with pytest.raises(ValueError, match=r"hnsw_m\n  Input should be greater than or equal to 2"):
        IndexParams(hnsw_m=1)
    index = build_index("exact", items.vectors[:10])  # bias None: zeros
    assert np.all(index.item_bias == 0) and index.item_vectors.shape == (10, 16)


# ---------------------------------------------------------------------- threads


def test_concurrent_searches_agree_with_serial(items: Items, built: dict[str, ItemIndex]) -> None:
    index = built["hnsw-ip"]
    chunks = [items.queries[i : i + 25] for i in range(0, 200, 25)]
    serial = [index.search(c, 10)[1] for c in chunks]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda c: index.search(c, 10)[1], chunks))
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


def test_short_approximate_rows_fall_back_to_brute_force(items: Items, caplog) -> None:
    # One probed list holds ~40 items, far fewer than k = 100: the rows are completed exactly.
    index = build_index("ivf", items.vectors, items.bias, IndexParams(nprobe=1, num_threads=1))
    with caplog.at_level("DEBUG", logger="service.index"):
        scores, ids = index.search(items.queries[:3], 100)
    assert "exact fallback" in caplog.text
    ref_scores, ref_ids = brute_force(items, items.queries[:3], 100)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------- bias weight


@pytest.mark.parametrize("name", ["exact", "hnsw-ip", "hnsw-l2", "ivf"])
def test_bias_weight_zero_ranks_by_inner_product(
    items: Items, exact: ItemIndex, built: dict[str, ItemIndex], name: str
) -> None:
    """``bias_weight=0`` scores ``u·w`` (item-to-item similarity with ``u = w_j``)."""
    index = exact if name == "exact" else built[name]
    queries = items.vectors[:40]
    exclude = [[i] for i in range(40)]
    scores, ids = index.search(queries, 10, exclude=exclude, bias_weight=0.0)
    no_bias = Items(items.vectors, np.zeros_like(items.bias), items.queries)
    _, ref_ids = brute_force(no_bias, queries, 10, exclude)
    valid = ids >= 0
    gathered = np.einsum(
        "nkd,nd->nk", items.vectors.astype(np.float64)[ids], queries.astype(np.float64)
    )
    np.testing.assert_allclose(scores[valid], gathered[valid], rtol=1e-6, atol=1e-5)
    assert not np.any(ids == np.arange(40)[:, None])
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref_ids)])
    assert recall >= (1.0 if name == "exact" else 0.8), recall
    half, _ = index.search(queries[:5], 3, bias_weight=0.5)
    assert np.isfinite(half).all()
    zero_scores, zero_ids = index.search(np.zeros((1, index.dim)), 3, bias_weight=0.0)
    assert (zero_ids >= 0).all() and np.allclose(zero_scores, 0.0)
    with pytest.raises(ValueError, match="bias_weight must be a finite number"):
        index.search(queries[:1], 3, bias_weight=float("nan"))


@pytest.mark.parametrize("name", ["hnsw-ip", "ivf"])
def test_set_search_params_trades_recall_for_speed(
    items: Items, exact: ItemIndex, name: str
) -> None:
    kind = "hnsw" if name.startswith("hnsw") else "ivf"
    params = HNSW_IP if kind == "hnsw" else IVF
    index = build_index(kind, items.vectors, items.bias, params)
    low = {"ef_search": 1} if kind == "hnsw" else {"nprobe": 1}
    high = {"ef_search": 256} if kind == "hnsw" else {"nprobe": 10_000}
    index.set_search_params(**low)
    recall_low = measure_recall(index, exact, items.queries, 10).recall
    index.set_search_params(**high)
    recall_high = measure_recall(index, exact, items.queries, 10).recall
    assert recall_high > recall_low and recall_high >= 0.98
    if kind == "ivf":
        ivf = index.backend
        assert isinstance(ivf, IVFBackend) and ivf.nprobe == ivf.nlist
    else:
        assert index.params.ef_search == 256
    with pytest.raises(ValueError, match="ef_search must be an int >= 1"):
        index.set_search_params(ef_search=0)


# ---------------------------------------------------------------------- MIPS transform


def test_mips_transform_turns_l2_distance_into_inner_product(items: Items) -> None:
    """``||[q, 0] - z_i||² = ||q||² + M² - 2 q·x_i`` with queries scaled to norm ``M``."""
    x = np.concatenate([items.vectors, items.bias[:, None]], axis=1)  # [N, d + 1]
    q = np.concatenate([items.queries[:20], np.ones((20, 1), np.float32)], axis=1)
    bound = float(squared_norms(x).max())
    z, qz = mips_items(x, bound), mips_queries(q, bound)
    assert z.shape == (3000, 18) and qz.shape == (20, 18) and np.all(qz[:, -1] == 0)
    np.testing.assert_allclose(squared_norms(z), bound, rtol=1e-5)  # every item on the sphere
    scale = np.sqrt(bound) / np.linalg.norm(q.astype(np.float64), axis=1)
    l2 = squared_norms((qz[:, None, :] - z[None, :, :]).reshape(-1, 18)).reshape(20, 3000)
    reference = bound + bound - 2 * scale[:, None] * (q.astype(np.float64) @ x.T)
    np.testing.assert_allclose(l2, reference, rtol=1e-4, atol=1e-3 * bound)
    with pytest.raises(ValueError, match="rebuild the index"):
        mips_items(2 * x[[int(np.argmax(squared_norms(x)))]], bound)
