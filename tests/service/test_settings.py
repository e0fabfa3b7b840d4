"""service.settings: defaults, derived paths, environment (nested index settings included),
validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.index import IndexParams
from service.settings import ArtifactSettings, ServiceSettings

TOKEN = "s3cret-token-0123456789"


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("SHARDREC_"):
            monkeypatch.delenv(name)


def test_defaults_and_derived_paths(artifacts: Path) -> None:
    s = ServiceSettings.from_mapping({"artifacts": str(artifacts)})
    assert (s.host, s.port, s.index.kind) == ("127.0.0.1", 8000, "hnsw")
    assert s.db_path == artifacts / "histories.sqlite"
    assert s.index.dir == artifacts / "index-hnsw"
    assert s.admin_token is None and not s.admin_enabled
    assert (s.max_k, s.max_history, s.max_batch, s.max_body_bytes) == (1000, 1000, 256, 1 << 20)
    assert s.log_level == "INFO"
    assert IndexParams.of(s.index) == IndexParams(
        nlist=None, nprobe=32, hnsw_m=32, hnsw_metric="ip", ef_construction=200, ef_search=128
    )


def test_explicit_values(artifacts: Path, tmp_path: Path) -> None:
    s = ServiceSettings.from_mapping(
        {
            "artifacts": artifacts,
            "index": {"kind": "ivf", "nlist": 64, "nprobe": 16, "num_threads": 1},
            "db_path": tmp_path / "db" / "h.sqlite",
            "admin_token": TOKEN,
            "log_level": "debug",
            "port": 0,
        }
    )
    assert s.index.dir == artifacts / "index-ivf"
    assert s.db_path == tmp_path / "db" / "h.sqlite"
    assert s.admin_enabled and s.admin_token is not None
    assert s.admin_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(s) and TOKEN not in str(s.model_dump())
    assert s.log_level == "DEBUG"
    params = IndexParams.of(s.index)
    assert (params.nlist, params.nprobe, params.num_threads) == (64, 16, 1)


def test_environment_is_read_with_prefix(artifacts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDREC_ARTIFACTS", str(artifacts))
    monkeypatch.setenv("SHARDREC_PORT", "9001")
    monkeypatch.setenv("SHARDREC_INDEX_KIND", "exact")
    monkeypatch.setenv("SHARDREC_ADMIN_TOKEN", "")  # empty: unset
    monkeypatch.setenv("SHARDREC_SOMETHING_ELSE", "ignored")
    s = ServiceSettings()
    assert (s.artifacts, s.port, s.index.kind, s.admin_token) == (artifacts, 9001, "exact", None)
    assert ServiceSettings(port=9002).port == 9002  # arguments win over the environment
    assert ServiceSettings.from_mapping({"artifacts": artifacts}).port == 8000  # env ignored


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"artifacts": "/definitely/not/here"}, "does not exist; train a model first"),
        ({"port": 70000}, "less than or equal to 65535"),
        ({"port": -1}, "greater than or equal to 0"),
        ({"index": {"kind": "lsh"}}, "'exact', 'ivf' or 'hnsw'"),
        ({"index": {"hnsw_metric": "cosine"}}, "'ip' or 'l2'"),
        ({"index": {"nlist": 0}}, "greater than or equal to 1"),
        ({"index": {"nlist": 8, "nprobe": 16}}, "nprobe must be <= nlist, got nprobe=16 > nlist=8"),
        ({"index": {"hnsw_m": 1}}, "greater than or equal to 2"),
        ({"index": {"ef_search": 0}}, "greater than or equal to 1"),
        ({"index": {"efSearch": 10}}, "Extra inputs are not permitted"),
        ({"admin_token": "short"}, "admin_token must be at least 16 characters, got 5"),
        ({"max_k": 0}, "greater than or equal to 1"),
        ({"max_batch": 0}, "greater than or equal to 1"),
        ({"max_history": 10**9}, "less than or equal to 100000"),
        ({"max_body_bytes": 10}, "greater than or equal to 1024"),
        ({"log_level": "loud"}, "log_level must be one of"),
        ({"db_synchronous": "OFF"}, "'FULL' or 'NORMAL'"),
        ({"port": "eighty"}, "valid integer"),
        ({"prot": 80}, "Extra inputs are not permitted"),
        ({"store": "postgres"}, "'sqlite' or 'redis'"),
        ({"redis_prefix": "a b"}, "should match pattern"),
        ({"reload_poll_s": 0.0}, "greater than or equal to 0.05"),
        ({"api_keys": f"{TOKEN},short"}, "number(s) [2] too short"),
    ],
)
def test_invalid_values_are_rejected_with_the_setting_named(
    artifacts: Path, values: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        ServiceSettings.from_mapping({"artifacts": artifacts, **values})
    text = str(info.value)
    assert message in text
    name, value = next(iter(values.items()))
    if isinstance(value, dict):  # a nested setting is named by its path
        name = f"{name}.{next(iter(value))}"
    assert name in text or "nprobe" in text


def test_artifacts_must_be_a_directory_and_db_path_a_file(artifacts: Path) -> None:
    file = artifacts / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(ValidationError, match="is not a directory"):
        ServiceSettings.from_mapping({"artifacts": file})
    with pytest.raises(ValidationError, match="db_path must be a file path"):
        ServiceSettings.from_mapping({"artifacts": artifacts, "db_path": artifacts})
    with pytest.raises(ValidationError, match="artifacts"):
        ServiceSettings.from_mapping({})


def test_serving_knobs(artifacts: Path) -> None:
    s = ServiceSettings.from_mapping({"artifacts": artifacts})
    assert (s.compute_threads, s.micro_batch, s.torch_threads) == (1, 64, None)
    assert (s.index.recall_queries, s.index.recall_k, s.index.save) == (500, 10, True)
    assert s.reseed_on_new_model and s.access_log
    with pytest.raises(ValidationError, match="compute_threads"):
        ServiceSettings.from_mapping({"artifacts": artifacts, "compute_threads": 0})
    with pytest.raises(ValidationError, match="micro_batch"):
        ServiceSettings.from_mapping({"artifacts": artifacts, "micro_batch": 0})


def test_serving_knobs_from_environment(artifacts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDREC_MICRO_BATCH", "8")
    monkeypatch.setenv("SHARDREC_RESEED_ON_NEW_MODEL", "false")
    s = ServiceSettings(artifacts=artifacts)
    assert s.micro_batch == 8 and not s.reseed_on_new_model


def test_index_settings_from_environment(artifacts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDREC_INDEX_EF_SEARCH", "7")
    monkeypatch.setenv("SHARDREC_INDEX_NLIST", "null")
    monkeypatch.setenv("SHARDREC_INDEX_DIR", str(artifacts / "elsewhere"))
    monkeypatch.setenv("SHARDREC_INDEX_SAVE", "false")
    s = ServiceSettings(artifacts=artifacts)
    assert (s.index.ef_search, s.index.nlist, s.index.save) == (7, None, False)
    assert s.index.dir == artifacts / "elsewhere"
    monkeypatch.setenv("SHARDREC_INDEX_EFSEARCH", "7")  # a misspelt index variable is refused
    with pytest.raises(ValidationError, match=r"index\.efsearch\n  Extra inputs"):
        ServiceSettings(artifacts=artifacts)


def test_the_index_command_needs_only_the_artifact_settings(artifacts: Path) -> None:
    s = ArtifactSettings.from_mapping({"artifacts": artifacts, "index": {"kind": "ivf"}})
    assert s.index.dir == artifacts / "index-ivf" and s.log_level == "INFO"
    assert not hasattr(s, "port") and "admin_token" not in ArtifactSettings.model_fields


def test_shared_store_and_security_settings(
    artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = ServiceSettings.from_mapping({"artifacts": artifacts})
    assert (s.store, s.redis_prefix, s.reload_poll_s) == ("sqlite", "shardrec:", 0.5)
    assert s.redis_url.get_secret_value() == "redis://127.0.0.1:6379/0"
    assert s.api_keys is None and s.api_key_set() == frozenset() and not s.auth_reads
    assert s.cors_origins == []
    monkeypatch.setenv("SHARDREC_STORE", "redis")
    monkeypatch.setenv("SHARDREC_REDIS_URL", "redis://:pw@10.0.0.5:6380/2")
    monkeypatch.setenv("SHARDREC_API_KEYS", f" {TOKEN} , other-key-0123456789 ")
    monkeypatch.setenv("SHARDREC_CORS_ORIGINS", "https://a.example, https://b.example")
    s = ServiceSettings(artifacts=artifacts)
    assert s.store == "redis" and "pw" not in repr(s)
    assert s.api_key_set() == {TOKEN, "other-key-0123456789"}
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    with pytest.raises(ValidationError, match="api_keys must not contain the admin token"):
        ServiceSettings(artifacts=artifacts, admin_token=TOKEN)
