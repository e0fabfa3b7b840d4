"""service.model and service.loading: loading (checksums, saved index reuse, recall), recommend
and similar against a NumPy reference, fallbacks, exclusions, unknown ids, features. No HTTP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.index import IndexSettings
from service.loading import load_model, training_user_vectors
from service.model import Model
from service.queries import UnknownItemError, UserQuery
from trainer.artifacts import ArtifactError


@pytest.fixture
def model_dir(tmp_path: Path, artifacts_a: Path) -> Path:
    """A private copy of model A's artifacts (tests write indexes into it)."""
    return Path(shutil.copytree(artifacts_a, tmp_path / "artifacts"))


@pytest.fixture(scope="module")
def exact_model(artifacts_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Model:
    index_dir = tmp_path_factory.mktemp("exact-index")
    return load_model(artifacts_a, IndexSettings(kind="exact", dir=index_dir))


def reference_top(
    model: Model, history: list[str], k: int, exclude: set[str], codes: dict[str, int]
) -> list[str]:
    """Brute force in float64: encode the known history, score u·w + b, drop exclusions."""
    rows = [model.artifacts.item_index()[i] for i in history]
    user = model.encode([rows], {n: [c] for n, c in codes.items()})[0].astype(np.float64)
    scores = model.artifacts.output_embeddings.astype(np.float64) @ user
    scores += model.artifacts.output_biases.astype(np.float64)
    ids = model.artifacts.item_ids
    for i, item in enumerate(ids):
        if item in exclude:
            scores[i] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return [str(ids[i]) for i in order if np.isfinite(scores[i])]


def user_codes(model: Model, user_id: str) -> dict[str, int]:
    row = list(model.artifacts.user_ids).index(user_id)
    return {n: int(v[row]) for n, v in model.artifacts.user_features.items()}


def test_recommend_matches_brute_force(exact_model: Model) -> None:
    m = exact_model
    history = [str(i) for i in m.artifacts.item_ids[[5, 17, 40, 3]]]
    [rec] = m.recommend([UserQuery(history=history, k=15, user_id="7")])
    expected = reference_top(m, history, 15, set(history), user_codes(m, "7"))
    assert rec.source == "model"
    assert [i.item_id for i in rec.items] == expected
    assert rec.history_length == 4
    assert rec.model_version == m.model_version
    scores = [i.score for i in rec.items]
    assert scores == sorted(scores, reverse=True)


def test_history_kept_when_not_excluded(exact_model: Model) -> None:
    m = exact_model
    history = [str(m.artifacts.item_ids[0])]
    [kept] = m.recommend([UserQuery(history=history, k=m.num_items, exclude_history=False)])
    [dropped] = m.recommend([UserQuery(history=history, k=m.num_items)])
    assert len(kept.items) == m.num_items
    assert history[0] in {i.item_id for i in kept.items}
    assert history[0] not in {i.item_id for i in dropped.items}
    assert len(dropped.items) == m.num_items - 1


def test_explicit_exclusions_and_unknown_ids_listed(exact_model: Model) -> None:
    m = exact_model
    history = ["nope-1", str(m.artifacts.item_ids[9]), "nope-2", "nope-1"]
    [free] = m.recommend([UserQuery(history=history, k=5)])
    banned = [free.items[0].item_id, free.items[2].item_id, "ghost"]
    [rec] = m.recommend([UserQuery(history=history, k=5, exclude=banned)])
    got = [i.item_id for i in rec.items]
    assert not set(banned) & set(got)
    assert rec.unknown_items == ["nope-1", "nope-2", "ghost"]
    assert rec.history_length == 1
    expected = reference_top(m, [history[1]], 5, {history[1], *banned}, {"age": 0, "segment": 0})
    assert got == expected


def test_popularity_fallback_without_known_history(exact_model: Model) -> None:
    m = exact_model
    pop = m.artifacts.popularity
    order = [str(m.artifacts.item_ids[i]) for i in np.argsort(-pop, kind="stable")]
    [empty, unknown, excluded] = m.recommend(
        [
            UserQuery(history=[], k=4),
            UserQuery(history=["zzz"], k=4),
            UserQuery(history=[], k=4, exclude=order[:2]),
        ]
    )
    for rec in (empty, unknown):
        assert rec.source == "popularity"
        assert [i.item_id for i in rec.items] == order[:4]
        assert rec.history_length == 0
    assert [i.score for i in empty.items] == [float(p) for p in sorted(pop, reverse=True)[:4]]
    assert unknown.unknown_items == ["zzz"]
    assert [i.item_id for i in excluded.items] == order[2:6]


def test_one_batch_mixes_model_and_fallback_rows(exact_model: Model) -> None:
    m = exact_model
    h = [str(m.artifacts.item_ids[1])]
    queries = [UserQuery(history=h, k=3), UserQuery(history=[], k=2), UserQuery(history=h, k=7)]
    batch = m.recommend(queries)
    alone = [m.recommend([q])[0] for q in queries]
    assert [r.source for r in batch] == ["model", "popularity", "model"]
    assert [len(r.items) for r in batch] == [3, 2, 7]
    for b, a in zip(batch, alone):
        assert [i.item_id for i in b.items] == [i.item_id for i in a.items]
        np.testing.assert_allclose(
            [i.score for i in b.items], [i.score for i in a.items], rtol=1e-5
        )


def test_features_from_artifacts_unless_given(exact_model: Model) -> None:
    m = exact_model
    h = [str(m.artifacts.item_ids[i]) for i in (2, 8)]
    vocab = m.artifacts.feature_vocab["user_features"]
    codes = user_codes(m, "11")
    other_age = next(c for c in range(1, len(vocab["age"])) if c != codes["age"])
    [as_user] = m.recommend([UserQuery(history=h, k=30, user_id="11")])
    [overridden] = m.recommend(
        [UserQuery(history=h, k=30, user_id="11", features={"age": vocab["age"][other_age]})]
    )
    [unknown_value] = m.recommend(
        [UserQuery(history=h, k=30, features={"age": "no-such-age", "shoe": "42"})]
    )
    [anonymous] = m.recommend([UserQuery(history=h, k=30)])

    def ranked(rec):
        return [i.item_id for i in rec.items]

    assert ranked(as_user) == reference_top(m, h, 30, set(h), codes)
    assert ranked(overridden) == reference_top(m, h, 30, set(h), {**codes, "age": other_age})
    assert ranked(unknown_value) == ranked(anonymous)  # unknown value -> code 0, like no user
    assert unknown_value.ignored_features == ["shoe"]


def test_similar_ranks_by_output_embedding_and_excludes_itself(exact_model: Model) -> None:
    m = exact_model
    w = m.artifacts.output_embeddings.astype(np.float64)
    row = 12
    item = str(m.artifacts.item_ids[row])
    got = m.similar(item, 6)
    scores = w @ w[row]
    scores[row] = -np.inf
    expected = [str(m.artifacts.item_ids[i]) for i in np.argsort(-scores, kind="stable")[:6]]
    assert [i.item_id for i in got] == expected
    np.testing.assert_allclose([i.score for i in got], np.sort(scores)[::-1][:6], rtol=1e-5)
    assert len(m.similar(item, 10_000)) == m.num_items - 1
    with pytest.raises(UnknownItemError, match="unknown item id 'nope'"):
        m.similar("nope", 3)


def test_k_larger_than_catalogue_and_bad_k(exact_model: Model) -> None:
    [rec] = exact_model.recommend([UserQuery(history=[], k=10_000)])
    assert len(rec.items) == exact_model.num_items
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        exact_model.recommend([UserQuery(history=[], k=0)])


def test_build_measures_recall_saves_then_reloads_the_index(model_dir: Path) -> None:
    params = IndexSettings(hnsw_m=8, ef_construction=40, ef_search=16, recall_queries=200)
    built = load_model(model_dir, params)
    info = built.index_info
    assert info.source == "built" and info.path == str(model_dir / "index-hnsw")
    assert info.recall is not None and info.recall.num_queries == 200 and info.recall.k == 10
    assert 0.5 <= info.recall.recall <= 1.0
    again = load_model(model_dir, params)
    assert again.index_info.source == "loaded"
    assert again.index_info.recall == info.recall
    summary = again.summary()
    assert summary["index"]["kind"] == "hnsw" and summary["index"]["recall"]["recall"] > 0.5
    assert summary["num_items"] == 300 and summary["embedding_dim"] == 16
    # The saved index does not belong to another model's vectors: a mismatch is rebuilt.
    meta = json.loads((model_dir / "index-hnsw" / "index.json").read_text())
    meta["fingerprint"] = "0" * 64
    (model_dir / "index-hnsw" / "index.json").write_text(json.dumps(meta))
    assert load_model(model_dir, params).index_info.source == "built"


def test_ivf_and_exact_kinds(model_dir: Path) -> None:
    ivf = load_model(model_dir, IndexSettings(kind="ivf", nlist=4, nprobe=4, save=False))
    assert ivf.index.kind == "ivf" and ivf.index_info.path is None
    assert ivf.index_info.recall is not None and ivf.index_info.recall.recall == 1.0
    exact = load_model(model_dir, IndexSettings(kind="exact", save=False))
    assert exact.index_info.recall is not None and exact.index_info.recall.num_queries == 0


def test_corrupt_or_missing_artifacts_are_refused(model_dir: Path) -> None:
    tables = model_dir / "item_tables.safetensors"
    original = tables.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    tables.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"checksum mismatch for item_tables\.safetensors"):
        load_model(model_dir, IndexSettings(kind="exact"))
    tables.write_bytes(original)
    (model_dir / "user_tower.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"user_tower\.safetensors listed in the manifest is"):
        load_model(model_dir, IndexSettings(kind="exact"))
    with pytest.raises(ArtifactError, match=r"manifest\.json is missing"):
        load_model(model_dir / "nowhere", IndexSettings(kind="exact"))


def test_training_user_vectors(exact_model: Model) -> None:
    vectors = training_user_vectors(exact_model.artifacts, 50)
    assert vectors.shape == (50, 16) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    assert np.unique(vectors.round(5), axis=0).shape[0] > 40  # distinct users
