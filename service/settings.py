"""Configuration of the serving process: `ServiceSettings` (and `ArtifactSettings`, the part
that ``python -m service index`` needs).

Values come from the command line (flags generated from these fields, see `service.cli`), then
keyword arguments, then ``SHARDREC_*`` environment variables (``SHARDREC_PORT``, and for the
nested index settings ``SHARDREC_INDEX_KIND``, ``SHARDREC_INDEX_EF_SEARCH``, ...), then the
defaults below. Everything is validated when the object is built, so a bad deployment fails at
start-up with a message naming the setting.

``ServiceSettings.from_mapping(d)`` builds settings from a plain dict only, ignoring the
environment (tests, config files).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from service.index import IndexSettings

logger = logging.getLogger(__name__)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MIN_ADMIN_TOKEN_CHARS = 16
DB_FILE = "histories.sqlite"

# Set by `ServiceSettings.from_mapping`: read the keyword arguments only, no environment.
_ARGUMENTS_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "shardrec_settings_arguments_only", default=False
)

_Settings = TypeVar("_Settings", bound="ArtifactSettings")


class ArtifactSettings(BaseSettings):
    """The served artifact directory and its index (environment prefix ``SHARDREC_``)."""

    model_config = SettingsConfigDict(
        env_prefix="SHARDREC_",
        # SHARDREC_INDEX_EF_SEARCH -> index.ef_search: one split after the section name.
        env_nested_delimiter="_",
        env_nested_max_split=1,
        env_parse_none_str="null",
        extra="forbid",
        validate_default=True,
    )

    artifacts: Path = Field(
        description="Directory of the trained model artifacts (must exist).",
    )
    index: IndexSettings = Field(
        default_factory=IndexSettings, description="The retrieval index (SHARDREC_INDEX_*)."
    )
    log_level: str = Field("INFO", description=f"One of {LOG_LEVELS}.")

    @classmethod
    def from_mapping(cls: type[_Settings], values: Mapping[str, Any]) -> _Settings:
        """Settings from ``values`` and the defaults only (``SHARDREC_*`` variables ignored)."""
        token = _ARGUMENTS_ONLY.set(True)
        try:
            return cls(**dict(values))
        finally:
            _ARGUMENTS_ONLY.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if _ARGUMENTS_ONLY.get():
            return (init_settings,)
        return init_settings, env_settings, dotenv_settings, file_secret_settings

    @field_validator("artifacts")
    @classmethod
    def _artifacts_exist(cls, value: Path) -> Path:
        value = value.expanduser()
        if not value.is_dir():
            state = "is not a directory" if value.exists() else "does not exist"
            raise ValueError(
                f"artifacts must be the directory of a trained model, got {str(value)!r} which "
                f"{state}; train a model first or set SHARDREC_ARTIFACTS to its output directory"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: object) -> object:
        if isinstance(value, str):
            upper = value.strip().upper()
            if upper not in LOG_LEVELS:
                raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {value!r}")
            return upper
        return value

    @model_validator(mode="after")
    def _index_dir(self) -> ArtifactSettings:
        if self.index.dir is None:
            self.index = self.index.model_copy(update={"dir": self.index.directory(self.artifacts)})
        return self


class ServiceSettings(ArtifactSettings):
    """Settings of the recommendation service (environment prefix ``SHARDREC_``)."""

    host: str = Field("127.0.0.1", min_length=1, description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port).")

    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads (process-global); None: torch default."
    )
    compute_threads: int = Field(
        1,
        ge=1,
        le=64,
        description="Threads running recommendation batches (encoder + index search); the "
        "event loop never runs them.",
    )
    micro_batch: int = Field(
        64,
        ge=1,
        le=4096,
        description="Most user queries coalesced into one encoder + search batch when requests "
        "arrive together (1: no coalescing).",
    )

    db_path: Path | None = Field(
        None, description=f"SQLite file of user histories; default <artifacts>/{DB_FILE}."
    )
    db_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL",
        description="SQLite synchronous mode (FULL: acknowledged writes survive power loss).",
    )
    reseed_on_new_model: bool = Field(
        True,
        description="When the served model version differs from the one the history store was "
        "seeded with (start-up with new artifacts, or a reload), replace the stored histories "
        "with the new model's training histories; False seeds only an empty store and keeps "
        "every appended event across model versions.",
    )
    store: Literal["sqlite", "redis"] = Field(
        "sqlite",
        description="History store: 'sqlite' (embedded file, one machine: one process or "
        "--workers N) or 'redis' (shared by replicas on several machines).",
    )
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis server of store='redis' (environment only: it may hold a password).",
    )
    redis_prefix: str = Field(
        "shardrec:",
        min_length=1,
        max_length=128,
        pattern=r"^[^\s\x00]+$",
        description="Prefix of every Redis key (deployments sharing a server use their own).",
    )
    reload_poll_s: float = Field(
        0.5,
        ge=0.05,
        le=60.0,
        description="How often each process checks the store's model pointer (a reload through "
        "another worker or replica moves it).",
    )
    admin_token: SecretStr | None = Field(
        None,
        description=(
            f"Bearer token of the admin routes (>= {MIN_ADMIN_TOKEN_CHARS} characters); "
            "admin routes are refused while unset."
        ),
    )
    api_keys: SecretStr | None = Field(
        None,
        description=(
            "Comma-separated API keys (each >= "
            f"{MIN_ADMIN_TOKEN_CHARS} characters, none equal to the admin token) accepted as "
            "'Authorization: Bearer <key>' on event writes (and reads with auth_reads); event "
            "writes are refused while unset."
        ),
    )
    auth_reads: bool = Field(
        False,
        description="Also require an API key on recommendations, similar items, histories and "
        "the model summary.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed by CORS (e.g. https://app.example.com, or * for any); "
        "empty: no CORS headers (browsers on other origins are refused).",
    )

    max_k: int = Field(1000, ge=1, le=100_000, description="Largest k a request may ask for.")
    max_history: int = Field(
        1000, ge=1, le=100_000, description="Most history items per request / user-tower input."
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, le=1 << 30, description="Largest accepted request body, in bytes."
    )
    max_batch: int = Field(256, ge=1, le=100_000, description="Most users per batch request.")
    access_log: bool = Field(True, description="Log every request (uvicorn's access log).")

    @field_validator("admin_token", "api_keys", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: object) -> object:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("admin_token")
    @classmethod
    def _token_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(
                f"admin_token must be at least {MIN_ADMIN_TOKEN_CHARS} characters, got "
                f"{len(value.get_secret_value())}; generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'` or leave it "
                "unset to disable the admin routes"
            )
        return value

    @field_validator("api_keys")
    @classmethod
    def _key_lengths(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        keys = [k.strip() for k in value.get_secret_value().split(",")]
        short = [i for i, k in enumerate(keys) if len(k) < MIN_ADMIN_TOKEN_CHARS]
        if short:
            raise ValueError(
                f"api_keys must be comma-separated keys of at least {MIN_ADMIN_TOKEN_CHARS} "
                f"characters, got {len(keys)} key(s), number(s) {[i + 1 for i in short]} too "
                "short; generate each with `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`"
            )
        return SecretStr(",".join(keys))

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("db_path")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @model_validator(mode="after")
    def _db_path(self) -> ServiceSettings:
        if self.db_path is None:
            self.db_path = self.artifacts / DB_FILE
        if self.db_path.exists() and self.db_path.is_dir():
            raise ValueError(
                f"db_path must be a file path, got the directory {str(self.db_path)!r}; point "
                f"SHARDREC_DB_PATH to a file such as {str(self.db_path / DB_FILE)!r}"
            )
        return self

    @model_validator(mode="after")
    def _keys_are_not_the_admin_token(self) -> ServiceSettings:
        if (
            self.admin_token is not None
            and self.admin_token.get_secret_value() in self.api_key_set()
        ):
            raise ValueError(
                "api_keys must not contain the admin token: use a separate credential for "
                "event writes (SHARDREC_API_KEYS) and for the admin routes (SHARDREC_ADMIN_TOKEN)"
            )
        return self

    def api_key_set(self) -> frozenset[str]:
        """The accepted API keys (empty while ``api_keys`` is unset)."""
        if self.api_keys is None:
            return frozenset()
        return frozenset(self.api_keys.get_secret_value().split(","))

    @property
    def admin_enabled(self) -> bool:
        """Whether admin routes are served (an admin token is set)."""
        return self.admin_token is not None
