"""Server configuration: defaults < JSON config file < ALCHEMIST_API_KEYS / ALCHEMIST_ADMIN_KEYS <
command-line flags. The "engine" and "training" objects are EngineConfig and TrainerConfig."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from engine.config import EngineConfig, alchemist_home
from common.errors import ConfigError
from trainer.config import TrainerConfig

API_KEYS_ENV = "ALCHEMIST_API_KEYS"
ADMIN_KEYS_ENV = "ALCHEMIST_ADMIN_KEYS"
DEFAULT_RETENTION_DAYS = 30.0


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)   # empty (and no admin keys): no authentication
    admin_api_keys: list[str] = field(default_factory=list)   # may also call /v1/adapters, /v1/training
    served_model_name: str | None = None                 # None: derived from the model folder
    db_path: str | None = None                           # None: $ALCHEMIST_HOME/alchemist.db
    retention_days: float | None = DEFAULT_RETENTION_DAYS  # None: keep completions forever
    max_waiting: int = 1024                              # requests waiting to be scheduled before 429
    max_prompt_tokens: int | None = None                 # None: the model context decides
    metrics_auth: bool = False                           # True: /metrics, /health, /dashboard and its data need a key
    dashboard_interval_s: float = 2.0                    # /dashboard: one history point every this often
    dashboard_history_s: float = 900.0                   # /dashboard: points kept (in memory) for this long
    docs: bool = True                                    # False: no /docs, /redoc, /openapi.json
    docs_auth: bool = True                               # with keys configured the docs need one too
    max_request_bytes: int = 4 << 20                     # bigger bodies: 413 before they are read
    request_workers: int = 4                             # threads for tokenizing / templating requests
    header_timeout_s: float = 10.0                       # a request's headers must arrive within this
    keep_alive_timeout_s: float = 5.0                    # idle keep-alive connections close after this
    limit_concurrency: int | None = 1000                 # open connections beyond this: 503 (None: no limit)
    max_header_bytes: int = 65536                        # request line + headers beyond this: 431
    log_level: str = "info"
    graceful_shutdown_s: float = 5.0                     # in-flight requests get this long on SIGTERM
    engine: EngineConfig = field(default_factory=EngineConfig)
    training: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port={self.port!r}: use an integer in [0, 65535]")
        if any(not isinstance(k, str) or not k.strip() for k in self.api_keys + self.admin_api_keys):
            raise ConfigError("api_keys and admin_api_keys must be non-empty strings")
        if self.retention_days is not None and self.retention_days <= 0:
            raise ConfigError("retention_days must be > 0 (or null to keep everything)")
        if isinstance(self.max_waiting, bool) or not isinstance(self.max_waiting, int) or self.max_waiting < 1:
            raise ConfigError(f"max_waiting={self.max_waiting!r}: use an integer >= 1")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError("max_prompt_tokens must be >= 1")
        self._validate_limits()
        self._validate_dashboard()

    def _validate_dashboard(self) -> None:
        interval, history = self.dashboard_interval_s, self.dashboard_history_s
        for name, value in (("dashboard_interval_s", interval), ("dashboard_history_s", history)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
                raise ConfigError(f"{name}={value!r}: use a number of seconds in (0, 86400]")
        if history < interval or history / interval > 100_000:
            raise ConfigError(f"dashboard_history_s={history!r} over dashboard_interval_s={interval!r}: "
                              "keep between 1 and 100000 points")

    def _validate_limits(self) -> None:
        for name, low in (("max_request_bytes", 1024), ("request_workers", 1), ("max_header_bytes", 1024)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}={value!r}: use an integer >= {low}")
        for name in ("header_timeout_s", "keep_alive_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
                raise ConfigError(f"{name}={value!r}: use a number of seconds in (0, 3600]")
        if self.limit_concurrency is not None and (isinstance(self.limit_concurrency, bool) or
                                                   not isinstance(self.limit_concurrency, int) or
                                                   self.limit_concurrency < 1):
            raise ConfigError(f"limit_concurrency={self.limit_concurrency!r}: use an integer >= 1 or null")

    @property
    def retention_seconds(self) -> float | None:
        return None if self.retention_days is None else self.retention_days * 86400.0

    def resolved_db_path(self) -> Path:
        return Path(self.db_path) if self.db_path else alchemist_home() / "alchemist.db"

    def resolved_run_dir(self) -> Path:
        """Checkpoints of the online trainer: $ALCHEMIST_HOME/runs/<training.run_name>."""
        return alchemist_home() / "runs" / self.training.run_name

    @classmethod
    def from_dict(cls, values: dict) -> "ServerConfig":
        if not isinstance(values, dict):
            raise ConfigError("the config file must hold a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown server option(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        engine = values.pop("engine", None) or {}
        training = values.pop("training", None) or {}
        for name, value in (("engine", engine), ("training", training)):
            if not isinstance(value, dict):
                raise ConfigError(f"'{name}' must be a JSON object of {name} options")
        return cls(**values, engine=EngineConfig.from_dict(engine), training=TrainerConfig.from_dict(training))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ServerConfig":
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(values)


def env_api_keys(name: str = API_KEYS_ENV) -> list[str]:
    return [k.strip() for k in os.environ.get(name, "").split(",") if k.strip()]


def build_config(config_file: str | None = None, *, host: str | None = None, port: int | None = None,
                 api_keys: list[str] | None = None, model: str | None = None,
                 overrides: dict | None = None, admin_api_keys: list[str] | None = None,
                 training: bool | None = None) -> ServerConfig:
    """Merge the layers; keys from the file, the environment and the flags are all accepted.
    `training=False` (--no-training) turns the online trainer off whatever the file says."""
    cfg = ServerConfig.load(config_file) if config_file else ServerConfig()
    if host is not None:
        cfg.host = host
    if port is not None:
        cfg.port = port
    keys = cfg.api_keys + env_api_keys() + list(api_keys or [])
    cfg.api_keys = list(dict.fromkeys(keys))            # de-duplicated, order kept
    admin = cfg.admin_api_keys + env_api_keys(ADMIN_KEYS_ENV) + list(admin_api_keys or [])
    cfg.admin_api_keys = list(dict.fromkeys(admin))
    if training is not None:
        cfg.training.enabled = training
    for name, value in (overrides or {}).items():
        if value is not None:
            setattr(cfg, name, value)
    if model:
        cfg.engine.model = model
    cfg.validate()
    return cfg
