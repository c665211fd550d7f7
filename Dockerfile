# sp2ot service image: the API (`sp2ot serve`), the Celery worker (`sp2ot worker`) and the
# migration step (`sp2ot migrate`) all run from it. See docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libgomp: OpenMP runtime used by torch/faiss CPU kernels.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /srv/sp2ot
# Dependencies first (cached layer), then the code.
COPY pyproject.toml README.md ./
COPY sp2ot_engine ./sp2ot_engine
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
COPY alembic.ini ./
RUN pip install ".[service]"

RUN useradd --create-home --uid 1000 sp2ot \
    && mkdir -p /data \
    && chown sp2ot:sp2ot /data
USER sp2ot

ENV SP2OT_DATA_DIR=/data \
    SP2OT_HOST=0.0.0.0 \
    SP2OT_PORT=8000
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=4).status != 200)"

# Listening on 0.0.0.0 requires SP2OT_AUTH_REQUIRED=true (the server refuses otherwise).
CMD ["sp2ot", "serve", "--host", "0.0.0.0", "--port", "8000"]
