"""All service settings, read once from ``SP2OT_*`` environment variables.

There is exactly one settings object (:class:`Settings`); every other module receives it
(the API through ``app.state.settings``, the worker through :func:`get_settings`).
"""
from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sp2ot_engine.options import Backbone, Formulation, Init, Mode

GiB = 1024**3
MiB = 1024**2


def _default_data_dir() -> Path:
    """``~/.sp2ot`` when the home directory is writable, else ``./.sp2ot-data``."""
    home = Path(os.path.expanduser("~"))
    try:
        if home.is_dir() and os.access(home, os.W_OK):
            return home / ".sp2ot"
    except OSError:  # pragma: no cover - exotic home directories
        pass
    return Path.cwd() / ".sp2ot-data"


def is_loopback_host(host: str) -> bool:
    """True for hosts that only accept connections from this machine."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Service configuration. Every field is set by the environment variable
    ``SP2OT_<FIELD NAME IN UPPER CASE>``."""

    model_config = SettingsConfigDict(env_prefix="SP2OT_", extra="ignore", validate_default=True)

    # --- storage -------------------------------------------------------------------
    data_dir: Path = Field(default_factory=_default_data_dir, description="Uploads (stored as they came, with their manifests), job files, SQLite file.")
    database_url: str = Field(
        "",
        description="SQLAlchemy URL; empty = SQLite file <data_dir>/sp2ot.db. "
        "PostgreSQL: postgresql+psycopg://user:pass@host/db",
    )
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(20, ge=0)
    db_pool_pre_ping: bool = Field(
        False,
        description="Test each pooled connection before use (one more round trip per request). Without it, "
        "connections broken by a database restart are discarded when they fail.",
    )
    run_migrations: bool = Field(True, description="Apply `alembic upgrade head` when the API or a worker starts.")

    # --- HTTP server -----------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    auth_required: bool = Field(
        False,
        description="Require `Authorization: Bearer KEY` on every request. Without it the server "
        "refuses to listen on anything but a loopback address and answers only local clients.",
    )
    log_level: str = "info"
    secret_key: str = Field(
        "", description="Signs the web pages' CSRF tokens. Empty: a random key kept in <data_dir>/secret_key "
        "(processes sharing the data dir share it; set it when they do not).",
    )
    session_cookie_days: float = Field(30.0, gt=0, description="How long the web pages' login cookie lasts.")

    # --- queue / worker ----------------------------------------------------------------
    broker_url: str = Field("", description="Celery broker (redis://...). Empty = in-process worker threads.")
    broker_key_prefix: str = Field("", description="Prefix for every Redis key (isolates several deployments/tests).")
    queue: str = "sp2ot"
    broker_visibility_timeout: int | None = Field(
        None,
        ge=1,
        description="Seconds before an unacknowledged task (worker died) is delivered again. "
        "Default: task_time_limit + 600 so a long job is never delivered twice while it runs.",
    )
    broker_restore_interval: float = Field(10.0, gt=0, description="How often workers look for such tasks.")
    worker_concurrency: int = Field(1, ge=1, description="Jobs run at once by one worker (1 per GPU).")
    embedded_workers: int = Field(1, ge=1, description="Threads running jobs inside the API when broker_url is empty.")
    task_soft_time_limit: int = Field(6 * 3600, ge=1, description="A job running longer fails with a clear message.")
    task_time_limit: int = Field(6 * 3600 + 300, ge=1, description="Hard limit: the worker process is killed.")
    heartbeat_interval: float = Field(5.0, gt=0, description="A running job's worker refreshes its heartbeat this often.")
    heartbeat_timeout: float = Field(
        60.0, gt=0, description="A running job whose heartbeat is older has lost its worker: the reaper re-queues "
        "it (or ends it, when it was cancelled or its attempts are used up)."
    )
    max_attempts: int = Field(
        3, ge=1, description="A job whose worker died this many times (crash, out of memory, hard time limit) fails."
    )
    reaper_interval: float = Field(
        15.0, gt=0, description="Seconds between two passes of the API process's reaper: it re-queues running jobs "
        "whose heartbeat is older than heartbeat_timeout (their worker is gone) and applies the retention settings.",
    )
    progress_interval: float = Field(0.5, ge=0, description="Minimum seconds between two progress writes.")
    cancel_check_interval: float = Field(0.5, ge=0, description="Minimum seconds between two cancel-flag reads.")

    # --- retention ------------------------------------------------------------------------
    job_ttl_days: float = Field(
        0, ge=0, description="Finished jobs (their results and files) are deleted this many days after they "
        "finished. 0 = kept until deleted.",
    )
    dataset_ttl_days: float = Field(
        0, ge=0, description="Datasets no job was created from for this many days are deleted, unless a queued or "
        "running job uses them. 0 = kept until deleted.",
    )

    # --- engine ---------------------------------------------------------------------------
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N, mps")
    estimator: str = Field(
        "sp2ot_engine:SP2OTClustering", description="module:Class of the estimator (a test seam; keep the default)."
    )
    default_backbone: Backbone = Backbone.EFFICIENTNET_LITE0
    default_mode: Mode = Mode.FAST
    default_formulation: Formulation = Formulation.P2OT
    default_init: Init = Init.AUTO
    batch_size: int | None = Field(None, ge=2, description="Training batch size (default: the engine's).")
    num_workers: int = Field(0, ge=0, description="Image-decoding worker processes of a job.")
    torch_threads: int = Field(0, ge=0, description="CPU threads of torch in a job (0 = torch's default).")
    max_epochs: int = Field(1000, ge=1, description="Largest `epochs` a job may ask for.")
    max_clusters: int = Field(10_000, ge=2)

    # --- upload limits --------------------------------------------------------------------
    max_upload_bytes: int = Field(2 * GiB, ge=1, description="Largest request body (archive + fields); larger = 413.")
    max_truth_bytes: int = Field(64 * MiB, ge=1)
    max_archive_files: int = Field(100_000, ge=1)
    max_uncompressed_bytes: int = Field(10 * GiB, ge=1, description="Largest total size of the archive's files, "
                                        "uncompressed.")
    max_compression_ratio: float = Field(
        100.0, gt=1, description="Uncompressed/compressed ratio above which an archive is a bomb ..."
    )
    compression_ratio_floor: int = Field(
        64 * MiB, ge=0, description="... once its uncompressed size exceeds this many bytes."
    )
    max_image_pixels: int = Field(
        64 * 10**6, ge=1, description="Largest image (width x height, from its header) of an upload: a larger one "
        "refuses the upload (422 naming the image), and the worker never decodes one (skipped). Default 64 "
        "megapixels: every phone photo at its usual resolution and full-frame cameras up to 61 Mpx pass; one "
        "image decodes to at most 192 MB of RGB.",
    )
    max_upload_pixels: int = Field(
        50_000 * 64 * 10**6, ge=1, description="Largest total of the images' pixels of one upload (what the worker "
        "decodes). The default passes 50,000 images at the per-image limit.",
    )
    upload_chunk_bytes: int = Field(1 * MiB, ge=4096)

    # --- per-key fairness (the local owner of a server without keys counts as one key) ------------
    max_active_jobs_per_key: int = Field(
        20, ge=0, description="Queued + running jobs one API key may have at once; one more is a 429 with "
        "Retry-After. 0 = no limit.",
    )
    max_upload_bytes_per_hour: int = Field(
        20 * GiB, ge=0, description="Bytes one API key may upload (POST /jobs and POST /datasets bodies, accepted "
        "or not) in any hour; beyond it a 429 with Retry-After. 0 = no limit.",
    )
    # --- completion callbacks (a job's callback_url) ------------------------------------------
    callback_allowed_hosts: str = Field(
        "", description="Comma-separated host names (or IP addresses) a job's callback_url may point to, "
        "e.g. `hooks.example.org,127.0.0.1`; compared exactly, case-insensitively. Empty = callbacks disabled "
        "(a job with a callback_url is refused with a 422): the server sends requests nowhere else.",
    )
    callback_attempts: int = Field(4, ge=1, le=10, description="Deliveries tried per callback before giving up.")
    callback_backoff: float = Field(
        2.0, ge=0, description="Seconds before the first retry of a failed delivery; doubled for each next one.",
    )
    callback_timeout: float = Field(10.0, gt=0, description="Seconds one delivery may take (connect + answer).")

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return Path(os.path.expanduser(str(v))).absolute()

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.task_time_limit <= self.task_soft_time_limit:
            self.task_time_limit = self.task_soft_time_limit + 60
        return self

    # --- derived values ---------------------------------------------------------------------
    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'sp2ot.db'}"

    @property
    def is_sqlite(self) -> bool:
        return self.sqlalchemy_url.startswith("sqlite")

    @property
    def embedded(self) -> bool:
        """No broker: jobs run in threads of the API process."""
        return not self.broker_url

    @property
    def visibility_timeout(self) -> int:
        return self.broker_visibility_timeout or (self.task_time_limit + 600)

    @property
    def callback_hosts(self) -> frozenset[str]:
        """The hosts of :attr:`callback_allowed_hosts`, lower case (empty: callbacks disabled)."""
        return frozenset(h.strip().strip("[]").lower() for h in self.callback_allowed_hosts.split(",") if h.strip())

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.tmp_dir, self.data_dir / "datasets", self.data_dir / "jobs"):
            d.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (worker and CLI). The API uses ``app.state.settings``."""
    return Settings()
