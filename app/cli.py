"""``sp2ot`` command line.

Service commands::

    sp2ot serve [--host 127.0.0.1] [--port 8000]   API (+ in-process worker when SP2OT_BROKER_URL is empty)
    sp2ot worker [--pool prefork] [--concurrency 1] Celery worker (needs SP2OT_BROKER_URL): runs
                                                    ``celery -A worker.celery_app worker`` in this process
    sp2ot create-api-key NAME                       prints a new key once
    sp2ot list-api-keys | revoke-api-key NAME_OR_PREFIX
    sp2ot migrate                                   alembic upgrade head
    sp2ot cleanup                                   delete expired jobs and datasets (retention settings)

Anything else (cluster, assign, evaluate, benchmark, ...) is the engine's CLI (``sp2ot_engine.cli``).
Configuration comes from ``SP2OT_*`` environment variables (see ``app/core/config.py``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

SERVICE_COMMANDS = ("serve", "worker", "create-api-key", "list-api-keys", "revoke-api-key", "migrate", "cleanup")


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sp2ot",
        description="SP2OT image clustering: web service commands below; engine commands "
        "(cluster, assign, evaluate, benchmark, ...) are passed to the engine CLI.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("serve", help="run the HTTP API (embedded worker unless SP2OT_BROKER_URL is set)")
    s.add_argument("--host", default=None, help="listen address (default SP2OT_HOST or 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default SP2OT_PORT or 8000)")
    s.add_argument("--log-level", default=None)
    w = sub.add_parser("worker", help="run a Celery worker consuming the job queue")
    w.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"],
                   help="prefork (default) enforces time limits; solo runs jobs in the main process")
    w.add_argument("--concurrency", type=int, default=None, help="jobs at once (default SP2OT_WORKER_CONCURRENCY=1)")
    w.add_argument("--loglevel", default="INFO")
    w.add_argument("--hostname", default=None, help="worker name (default sp2ot@%%h)")
    k = sub.add_parser("create-api-key", help="create an API key and print it (shown only once)")
    k.add_argument("name")
    sub.add_parser("list-api-keys", help="list API keys (names and prefixes, never the keys)")
    r = sub.add_parser("revoke-api-key", help="revoke the keys with this name or prefix")
    r.add_argument("name_or_prefix")
    sub.add_parser("migrate", help="apply the database migrations (alembic upgrade head)")
    c = sub.add_parser("cleanup", help="delete finished jobs and unused datasets older than the retention settings")
    c.add_argument("--job-ttl-days", type=_days, default=None, help="default SP2OT_JOB_TTL_DAYS (0 = keep)")
    c.add_argument("--dataset-ttl-days", type=_days, default=None, help="default SP2OT_DATASET_TTL_DAYS (0 = keep)")
    return p


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads must sleep, not spin: on a shared CPU spinning threads steal the
    # cores their partners need (2-3x slower here). Only effective before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in SERVICE_COMMANDS:
        try:
            from sp2ot_engine.cli import main as engine_main  # lazy: pulls in torch
        except ModuleNotFoundError as e:
            if e.name not in ("sp2ot_engine.cli", "sp2ot_engine"):
                raise
            print(f"sp2ot: unknown command {argv[0]!r} (the engine commands are not installed). "
                  f"Service commands: {', '.join(SERVICE_COMMANDS)}.", file=sys.stderr)
            return 2
        return engine_main(argv) or 0
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        print("\nengine commands: sp2ot cluster|assign|evaluate|benchmark ... (see `sp2ot cluster --help`)")
        return 0
    return {
        "serve": _serve, "worker": _worker, "create-api-key": _create_key, "list-api-keys": _list_keys,
        "revoke-api-key": _revoke_key, "migrate": _migrate, "cleanup": _cleanup,
    }[args.command](args)


def _settings(**overrides):
    from pydantic import ValidationError

    from app.core.config import Settings

    try:
        base = Settings()
        return base.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        print(f"sp2ot: invalid configuration:\n{e}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve(args) -> int:
    settings = _settings(host=args.host, port=args.port, log_level=args.log_level)
    _logging(settings.log_level)
    from app.main import InsecureConfiguration, create_app

    try:
        app = create_app(settings)
    except InsecureConfiguration as e:
        print(f"sp2ot: {e}", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                timeout_graceful_shutdown=10)
    return 0


def _worker(args) -> int:
    settings = _settings()
    if not settings.broker_url:
        print("sp2ot: SP2OT_BROKER_URL is empty: set it (e.g. redis://localhost:6379/0) to run a worker. "
              "Without a broker, `sp2ot serve` runs jobs itself.", file=sys.stderr)
        return 2
    concurrency = args.concurrency or settings.worker_concurrency
    argv = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--queues", settings.queue,
        "--pool", args.pool, "--concurrency", str(concurrency), "--prefetch-multiplier", "1",
        "--loglevel", args.loglevel, "--without-gossip", "--without-mingle", "--hostname", args.hostname or "sp2ot@%h",
    ]
    if args.pool == "prefork":
        argv += ["-O", "fair"]
    # exec, not import: the worker imports app, never the other way round; the process (its
    # pid and process group) stays the same for supervisors.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def _db(settings=None):
    from app.core.db import Database, run_migrations

    settings = settings or _settings()
    settings.ensure_dirs()
    if settings.run_migrations:
        run_migrations(settings)
    return Database(settings)


def _create_key(args) -> int:
    from app import crud

    name = args.name.strip()
    if not name or len(name) > 200:
        print("sp2ot: the key name must be 1 to 200 characters", file=sys.stderr)
        return 2
    db = _db()
    with db.session() as s:
        row, key = crud.create_api_key(s, name)
        s.commit()
    print(key)
    print(f"API key {row.prefix}… created for {name!r}. It is shown only once: store it now. "
          "Send it as `Authorization: Bearer <key>`.", file=sys.stderr)
    return 0


def _list_keys(args) -> int:
    from app import crud

    db = _db()
    with db.session() as s:
        for k in crud.list_api_keys(s):
            state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
            print(f"{k.id}\t{k.prefix}…\t{k.name}\t{state}\tcreated {k.created_at:%Y-%m-%d %H:%M}")
    return 0


def _revoke_key(args) -> int:
    from app import crud

    db = _db()
    with db.session() as s:
        n = crud.revoke_api_key(s, args.name_or_prefix)
        s.commit()
    print(f"{n} key(s) revoked", file=sys.stderr)
    return 0 if n else 1


def _cleanup(args) -> int:
    from app.retention import cleanup
    from app.storage import Storage

    settings = _settings(job_ttl_days=args.job_ttl_days, dataset_ttl_days=args.dataset_ttl_days)
    _logging("info")
    if not (settings.job_ttl_days or settings.dataset_ttl_days):
        print("sp2ot: retention is off (SP2OT_JOB_TTL_DAYS and SP2OT_DATASET_TTL_DAYS are 0): nothing to do",
              file=sys.stderr)
        return 0
    db = _db(settings)
    try:
        report = cleanup(db, Storage(settings), settings)
    finally:
        db.dispose()
    print(f"deleted {len(report.jobs)} job(s) and {len(report.datasets)} dataset(s)", file=sys.stderr)
    return 0


def _migrate(args) -> int:
    from app.core.db import run_migrations

    settings = _settings()
    _logging("info")
    settings.ensure_dirs()
    run_migrations(settings)
    print("database schema is up to date", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
