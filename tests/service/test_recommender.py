"""service.recommender.Recommender: stored histories, events, seeding, reload and swap."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from service.index import IndexSettings
from service.loading import load_model
from service.model import Model
from service.queries import UserQuery
from service.recommender import Recommender, ReloadInProgressError, seed_store
from service.store import HistoryStore, SQLiteHistoryStore
from trainer.artifacts import ArtifactError


@pytest.fixture(scope="module")
def model_a(artifacts_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Model:
    return load_model(
        artifacts_a, IndexSettings(kind="exact", dir=tmp_path_factory.mktemp("idx-a"))
    )


@pytest.fixture(scope="module")
def model_b(artifacts_b: Path, tmp_path_factory: pytest.TempPathFactory) -> Model:
    return load_model(
        artifacts_b, IndexSettings(kind="exact", dir=tmp_path_factory.mktemp("idx-b"))
    )


@pytest.fixture
def store(tmp_path: Path):
    with SQLiteHistoryStore(tmp_path / "h.sqlite", synchronous="NORMAL") as s:
        yield s


@pytest.fixture
def recommender(model_a: Model, store: HistoryStore) -> Recommender:
    seed_store(store, model_a)
    return Recommender(model_a, store, history_limit=1000)


def ids(rec) -> list[str]:
    return [i.item_id for i in rec.items]


def test_stored_history_is_used_and_explicit_history_appended(
    recommender: Recommender, store: HistoryStore, model_a: Model
) -> None:
    stored = store.history("5", 1000)
    assert stored, "user 5 has training history"
    extra = [str(model_a.artifacts.item_ids[0])]
    [by_user] = recommender.recommend([UserQuery(user_id="5", k=10)])
    [same] = model_a.recommend([UserQuery(history=stored, k=10, user_id="5")])
    assert ids(by_user) == ids(same) and by_user.history_length == min(len(stored), 50)
    [both] = recommender.recommend([UserQuery(user_id="5", history=extra, k=10)])
    [ref] = model_a.recommend([UserQuery(history=[*stored, *extra], k=10, user_id="5")])
    assert ids(both) == ids(ref)
    assert extra[0] not in ids(both)


def test_unknown_user_without_history_gets_popularity(recommender: Recommender) -> None:
    [rec] = recommender.recommend([UserQuery(user_id="never-seen", k=3)])
    assert rec.source == "popularity" and len(rec.items) == 3


def test_events_change_the_next_recommendation(recommender: Recommender, model_a: Model) -> None:
    [before] = recommender.recommend([UserQuery(user_id="new-user", k=5)])
    assert before.source == "popularity"
    watched = [before.items[0].item_id, before.items[1].item_id, "not-an-item"]
    result = recommender.append_events("new-user", watched)
    assert (result.appended, result.history_length) == (3, 3)
    assert result.unknown_items == ["not-an-item"]
    [after] = recommender.recommend([UserQuery(user_id="new-user", k=5)])
    assert after.source == "model" and after.history_length == 2
    assert not set(watched) & set(ids(after))
    assert after.unknown_items == ["not-an-item"]
    assert recommender.history("new-user", 2) == (watched[1:], 3)


def test_similar_reports_the_serving_version(recommender: Recommender, model_a: Model) -> None:
    version, items = recommender.similar(str(model_a.artifacts.item_ids[3]), 4)
    assert version == model_a.model_version and len(items) == 4


def test_reload_swaps_and_reseeds(
    recommender: Recommender, store: HistoryStore, model_a: Model, model_b: Model
) -> None:
    recommender.append_events("1", [str(model_a.artifacts.item_ids[0])])
    result = recommender.reload(Path("ignored"), lambda _: model_b)
    assert recommender.model is model_b
    assert result.previous_version == model_a.model_version
    assert result.seeded_events == store.count() > 0
    assert store.model_version() == model_b.model_version
    [rec] = recommender.recommend([UserQuery(user_id="1", k=3)])
    assert rec.model_version == model_b.model_version


def test_reload_without_reseed_keeps_appended_events(
    recommender: Recommender, store: HistoryStore, model_a: Model, model_b: Model
) -> None:
    length = recommender.append_events("1", ["x"]).history_length
    result = recommender.reload(Path("ignored"), lambda _: model_b, reseed_on_new_model=False)
    assert result.seeded_events == 0 and store.length("1") == length
    assert recommender.model is model_b


def test_failed_reload_keeps_the_old_model(recommender: Recommender, model_a: Model) -> None:
    def broken(path: Path) -> Model:
        raise ArtifactError(f"{path}: checksum mismatch for item_tables.safetensors")

    with pytest.raises(ArtifactError, match="checksum mismatch"):
        recommender.reload(Path("/bad"), broken)
    assert recommender.model is model_a
    [rec] = recommender.recommend([UserQuery(user_id="3", k=2)])
    assert rec.model_version == model_a.model_version


def test_one_reload_at_a_time(recommender: Recommender, model_b: Model) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow(_: Path) -> Model:
        entered.set()
        release.wait(5)
        return model_b

    worker = threading.Thread(target=recommender.reload, args=(Path("x"), slow))
    worker.start()
    entered.wait(5)
    with pytest.raises(ReloadInProgressError, match="already in progress"):
        recommender.reload(Path("y"), slow)
    release.set()
    worker.join(5)
    assert recommender.model is model_b


def test_seed_store_is_idempotent_per_version(store: HistoryStore, model_a: Model) -> None:
    written = seed_store(store, model_a)
    assert written > 0 and seed_store(store, model_a) == 0
    assert store.model_version() == model_a.model_version
