"""docker-compose.yml and Dockerfile checks (no Docker engine runs here): the services
exist, and every SP2OT_* variable they set is a field of the settings object and valid."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
_SUBST = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    # ${VAR:-default} -> default (what compose uses when VAR is unset)
    return {k: _SUBST.sub(lambda m: m.group(2) or "", str(v)) for k, v in env.items()}


def test_services_exist(compose):
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(compose["services"])
    for name in ("api", "worker", "migrate"):
        assert compose["services"][name].get("build") or compose["services"][name].get("image")
    assert set(compose["volumes"]) >= {"pgdata", "sp2ot-data"}


def test_every_sp2ot_variable_is_a_setting(compose):
    from app.core.config import Settings

    fields = set(Settings.model_fields)
    for name, service in compose["services"].items():
        env = _env(service)
        for key, value in env.items():
            if key.startswith("SP2OT_"):
                assert key[len("SP2OT_"):].lower() in fields, f"{name}: {key} is not a setting"
        values = {k[len("SP2OT_"):].lower(): v for k, v in env.items() if k.startswith("SP2OT_")}
        if values:
            Settings(**values)  # every value parses


def test_important_settings_are_set(compose):
    from app.core.config import Settings, is_loopback_host

    for name in ("api", "worker", "migrate"):
        env = _env(compose["services"][name])
        assert env["SP2OT_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert "@postgres:5432/" in env["SP2OT_DATABASE_URL"]
        assert env["SP2OT_DATA_DIR"] == "/data"
        if name != "migrate":
            assert env["SP2OT_BROKER_URL"].startswith("redis://redis:6379")
    api = Settings(**{k[6:].lower(): v for k, v in _env(compose["services"]["api"]).items() if k.startswith("SP2OT_")})
    # The API listens on 0.0.0.0 inside its container: that requires authentication.
    assert api.auth_required and not is_loopback_host(api.host)
    worker = Settings(**{k[6:].lower(): v for k, v in _env(compose["services"]["worker"]).items()
                         if k.startswith("SP2OT_")})
    assert worker.device.startswith("cuda") and worker.worker_concurrency == 1
    assert worker.visibility_timeout > worker.task_time_limit > worker.task_soft_time_limit


def test_worker_reserves_a_gpu_and_uses_the_cli(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    assert worker["command"][:2] == ["sp2ot", "worker"]
    assert compose["services"]["api"]["command"][:2] == ["sp2ot", "serve"]
    assert compose["services"]["migrate"]["command"] == ["sp2ot", "migrate"]


def test_health_checks_volumes_and_start_order(compose):
    s = compose["services"]
    for name in ("postgres", "redis", "api", "worker"):
        assert s[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert s["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert s["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert s["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    # API and worker share the data dir (uploads are read by the worker).
    assert "sp2ot-data:/data" in s["api"]["volumes"] and "sp2ot-data:/data" in s["worker"]["volumes"]
    assert any(v.startswith("pgdata:") for v in s["postgres"]["volumes"])
    assert "/health/live" in " ".join(s["api"]["healthcheck"]["test"])


def test_dockerfile_and_console_script():
    text = (REPO / "Dockerfile").read_text()
    assert 'pip install ".[service]"' in text and "USER sp2ot" in text
    assert 'CMD ["sp2ot", "serve", "--host", "0.0.0.0"' in text
    for path in ("app", "worker", "migrations", "alembic.ini", "sp2ot_engine"):
        assert f"COPY {path}" in text, path
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sp2ot"] == "app.cli:main"
