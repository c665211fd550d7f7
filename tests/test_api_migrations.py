"""The schema exists only through the Alembic migrations: they must match the models, be
safe to run concurrently (the API and every worker upgrade at start-up) and reversible."""
from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import create_engine, inspect

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    REPO,
    service_env,
    settings_from,
    subprocess_env,
)

pytest_plugins = ["service_fixtures"]


def _diff(url: str) -> list:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from app.models import Base

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()


def test_postgres_migrations_match_models_and_run_concurrently(fresh_pg, tmp_path):
    """Three processes (like an API and two workers starting together) upgrade at once."""
    env = subprocess_env(service_env(data_dir=tmp_path, database_url=fresh_pg))
    procs = [subprocess.Popen([sys.executable, "-m", "app.cli", "migrate"], cwd=str(REPO), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(3)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()
    assert _diff(fresh_pg) == []


def test_sqlite_migrations_match_models_and_downgrade(tmp_path):
    from alembic import command

    from app.core.db import alembic_config, run_migrations

    settings = settings_from(service_env(data_dir=tmp_path))
    run_migrations(settings)
    assert _diff(settings.sqlalchemy_url) == []
    command.downgrade(alembic_config(settings.sqlalchemy_url), "base")
    engine = create_engine(settings.sqlalchemy_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    run_migrations(settings)
    assert _diff(settings.sqlalchemy_url) == []


def test_last_used_of_existing_datasets_is_filled_in(tmp_path):
    """0002 adds datasets.last_used_at: the newest job's creation, else the upload's."""
    from alembic import command
    from sqlalchemy import text

    from app.core.db import alembic_config, run_migrations

    settings = settings_from(service_env(data_dir=tmp_path))
    command.upgrade(alembic_config(settings.sqlalchemy_url), "0001_initial")
    engine = create_engine(settings.sqlalchemy_url)
    job = ("INSERT INTO jobs (id, owner_id, dataset_id, input_path, owns_input, input_name, n_clusters, backbone, "
           "mode, formulation, seed, has_truth, n_images, input_skipped, status, cancel_requested, attempts, "
           "progress, created_at) VALUES (:id, 1, :ds, 'x', 0, 'x', 2, 'b', 'fast', 'sp2ot', 0, 0, 1, '[]', "
           "'succeeded', 0, 1, '{}', :at)")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO api_keys (id, name, key_hash, prefix, created_at) "
                          "VALUES (1, 'k', 'h', 'p', '2024-01-01 00:00:00')"))
        for ds in ("used", "unused"):
            conn.execute(text("INSERT INTO datasets (id, owner_id, name, files_path, archive_bytes, "
                              "uncompressed_bytes, n_images, skipped, created_at) VALUES "
                              "(:id, 1, 'd', 'x', 0, 0, 1, '[]', '2024-01-01 00:00:00')"), {"id": ds})
        conn.execute(text(job), {"id": "j1", "ds": "used", "at": "2024-03-01 00:00:00"})
        conn.execute(text(job), {"id": "j2", "ds": "used", "at": "2024-05-01 00:00:00"})
    run_migrations(settings)
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT id, last_used_at FROM datasets")).all())
    engine.dispose()
    assert {k: str(v)[:10] for k, v in rows.items()} == {"used": "2024-05-01", "unused": "2024-01-01"}
    assert _diff(settings.sqlalchemy_url) == []


def test_revisions_form_one_chain_each_step_up_and_down(tmp_path):
    """One head, one line (the web UI's 0003_curation, the job option init 0004, the per-key
    upload usage 0005, callbacks and assign requests 0006, the chosen K and the image flags
    0007): a database at any earlier revision upgrades to the head, and every step goes back down."""
    from alembic import command
    from alembic.script import ScriptDirectory
    from sqlalchemy import text

    from app.core.db import alembic_config

    settings = settings_from(service_env(data_dir=tmp_path))
    cfg = alembic_config(settings.sqlalchemy_url)
    script = ScriptDirectory.from_config(cfg)
    chain = [rev.revision for rev in script.walk_revisions("base", "heads")][::-1]
    assert script.get_heads() == [chain[-1]] and len(set(chain)) == len(chain)
    assert [script.get_revision(r).down_revision for r in chain] == [None, *chain[:-1]]
    assert chain[2:] == ["0003_curation", "0004_job_init", "0005_upload_usage", "0006_assign_and_callbacks",
                         "0007_auto_k_flags"]
    engine = create_engine(settings.sqlalchemy_url)
    try:
        for rev in chain:  # from each earlier revision, one step up
            command.upgrade(cfg, rev)
        assert _diff(settings.sqlalchemy_url) == []
        for rev in reversed(chain):  # and each step down
            command.downgrade(cfg, script.get_revision(rev).down_revision or "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        command.upgrade(cfg, "0003_curation")  # main's head before the merge: its jobs get init=auto
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO api_keys (id, name, key_hash, prefix, created_at) "
                              "VALUES (1, 'k', 'h', 'p', '2024-01-01 00:00:00')"))
            conn.execute(text(
                "INSERT INTO jobs (id, owner_id, input_path, owns_input, input_name, n_clusters, backbone, mode, "
                "formulation, seed, has_truth, n_images, input_skipped, status, cancel_requested, attempts, "
                "progress, created_at) VALUES ('j', 1, 'x', 0, 'x', 2, 'b', 'fast', 'sp2ot', 0, 0, 1, '[]', "
                "'succeeded', 0, 1, '{}', '2024-01-01 00:00:00')"))
        command.upgrade(cfg, "head")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT init FROM jobs")).scalar_one() == "auto"
            # older jobs have no callback, and no attempt of one
            assert tuple(conn.execute(text("SELECT callback_url, callback_attempts FROM jobs")).one()) == (None, 0)
            # an older job keeps its K and has no range; its images no flags
            assert conn.execute(text("SELECT n_clusters, k_min, k_max FROM jobs")).one() == (2, None, None)
    finally:
        engine.dispose()
    assert _diff(settings.sqlalchemy_url) == []
