"""A small Python client of the sp2ot web service (httpx; tqdm for the progress bar; pandas
when it is installed). It talks HTTP only: it imports neither the server nor the engine.

::

    from sp2ot.client import Client

    client = Client("http://127.0.0.1:8000", api_key="sp2ot_...")   # api_key: None without authentication
    job = client.submit("my_images/", k=10, epochs=30)               # a folder is zipped; an archive sent as is
    job.wait()                                                       # a progress bar until it is final
    labels = job.labels()                                            # a DataFrame (pandas) or a list of dicts
    clusters = job.export("json")                                    # json/labelstudio: parsed; csv: text; zip: bytes
    job.export("zip", to="clusters.zip")                             # or streamed to a file
    new = job.assign("new_images/")                                  # new images into the job's clusters

Errors of the service are raised as :class:`ServiceError` with its message (what to fix) and
status; a job that failed or was cancelled raises :class:`JobFailed` from :meth:`Job.wait`.
"""
from __future__ import annotations

import csv
import io
import os
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx

__all__ = ["Client", "Job", "JobFailed", "ServiceError"]

FINAL = ("succeeded", "failed", "cancelled")
EXPORT_FORMATS = ("json", "csv", "labelstudio", "zip")


class ServiceError(Exception):
    """An error answer of the service: ``status`` (HTTP) and ``detail`` (its message)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class JobFailed(Exception):
    """The job (or assign request) ended without results: ``info`` is its JSON."""

    def __init__(self, info: dict):
        super().__init__(f"{info.get('id')} {info.get('status')}: {info.get('error') or 'no results'}")
        self.info = info


class Client:
    """The service at ``base_url``, as the owner of ``api_key`` (None: a local server without
    authentication). ``http``: an ``httpx.Client`` to send through instead of a new one (e.g.
    with its own transport or proxies); its base URL is then used."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: float = 300.0, http: httpx.Client | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_http = http is None
        self.http = http if http is not None else httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)
        self.headers = headers

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------------------- requests
    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        """One request; an error answer raises :class:`ServiceError`."""
        r = self.http.request(method, url, headers={**self.headers, **kwargs.pop("headers", {})}, **kwargs)
        _raise_for(r)
        return r

    @contextmanager
    def _stream(self, url: str, **params) -> Iterator[httpx.Response]:
        with self.http.stream("GET", url, headers=self.headers, params=params or None) as r:
            if r.status_code >= 400:
                r.read()
                _raise_for(r)
            yield r

    # --------------------------------------------------------------------------- jobs
    def submit(self, path_or_folder: str | os.PathLike, k: int | None = None, *,
               truth: str | os.PathLike | None = None, **options: Any) -> "Job":
        """Upload images and start a job: ``path_or_folder`` is an archive (zip, tar, tar.gz, ...),
        sent as it is, or a folder, zipped first (into a temporary file). ``k``: the number of
        clusters; ``options``: the job's other fields (backbone, mode, epochs, formulation, init,
        seed, callback_url, ...); ``truth``: a ``filename,label`` CSV for the metrics."""
        fields = {key: str(v) for key, v in options.items() if v is not None}
        if k is not None:
            fields["n_clusters"] = str(k)
        with _archive_of(path_or_folder) as (archive, name), \
                (open(truth, "rb") if truth is not None else _nothing()) as truth_file:
            files = {"archive": (name, archive, "application/octet-stream")}
            if truth_file is not None:
                files["truth"] = (Path(truth).name, truth_file, "text/csv")
            info = self.request("POST", "/jobs", data=fields, files=files).json()
        return Job(self, info)

    def job(self, job_id: str) -> "Job":
        """A job already made (by its id)."""
        return Job(self, self.request("GET", f"/jobs/{job_id}").json())

    def jobs(self, limit: int = 50, offset: int = 0) -> list["Job"]:
        """Your jobs, newest first."""
        page = self.request("GET", "/jobs", params={"limit": limit, "offset": offset}).json()
        return [Job(self, info) for info in page["items"]]

    def callback_secret(self) -> str:
        """The key of your jobs' completion callbacks' ``X-SP2OT-Signature`` (see :func:`verify_signature`)."""
        return self.request("GET", "/callback-secret").json()["secret"]


class Job:
    """A job of the service; ``info`` is its JSON as last read (:meth:`refresh`)."""

    def __init__(self, client: Client, info: dict):
        self.client = client
        self.info = info

    @property
    def id(self) -> str:
        return self.info["id"]

    @property
    def status(self) -> str:
        return self.info["status"]

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.status}>"

    def refresh(self) -> dict:
        self.info = self.client.request("GET", f"/jobs/{self.id}").json()
        return self.info

    def wait(self, timeout: float | None = None, *, poll: float = 1.0, progress: bool = True) -> dict:
        """Poll until the job is final, with a tqdm bar of its stage and percent (``progress``).
        Returns its JSON when it succeeded; raises :class:`JobFailed` when it failed or was
        cancelled, ``TimeoutError`` after ``timeout`` seconds."""
        info = _poll(lambda: self.refresh(), timeout, poll, progress, f"job {self.id[:8]}")
        if info["status"] != "succeeded":
            raise JobFailed(info)
        return info

    def cancel(self) -> dict:
        self.info = self.client.request("POST", f"/jobs/{self.id}/cancel").json()
        return self.info

    def delete(self) -> None:
        self.client.request("DELETE", f"/jobs/{self.id}")

    def metrics(self) -> dict:
        return self.client.request("GET", f"/jobs/{self.id}/metrics").json()

    def labels(self, *, as_frame: bool | None = None):
        """The cluster of every image (labels.csv): a pandas DataFrame when pandas is installed
        (``as_frame=False``: always rows), else a list of dicts (cluster an int, confidence and
        outlier_score floats, outlier a bool, other columns as text)."""
        return _table(self.client.request("GET", f"/jobs/{self.id}/labels.csv").text, as_frame)

    def export(self, format: str = "json", *, to: str | os.PathLike | None = None):
        """The clusters as ``format`` (json, csv, labelstudio, zip): parsed JSON for json and
        labelstudio, text for csv, bytes for zip; with ``to``, streamed to that file instead
        (returns its path)."""
        if format not in EXPORT_FORMATS:
            raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, not {format!r}")
        with self.client._stream(f"/jobs/{self.id}/export", format=format) as r:
            if to is not None:
                with open(to, "wb") as f:
                    for chunk in r.iter_bytes():
                        f.write(chunk)
                return Path(to)
            body = r.read()
        if format in ("json", "labelstudio"):
            import json

            return json.loads(body)
        return body.decode("utf-8") if format == "csv" else body

    def assign(self, path_or_folder: str | os.PathLike, *, wait: bool = True, timeout: float | None = None,
               progress: bool = True, as_frame: bool | None = None):
        """Put new images (an archive, or a folder, zipped first) into this job's clusters with
        its model, without training. Returns their rows (filename, cluster, confidence,
        outlier_score, outlier) like :meth:`labels`; ``wait=False``: the assign request's JSON at
        once (poll its ``links.self``)."""
        with _archive_of(path_or_folder) as (archive, name):
            req = self.client.request("POST", f"/jobs/{self.id}/assign",
                                      files={"archive": (name, archive, "application/octet-stream")}).json()
        if not wait:
            return req
        url = req["links"]["self"]
        req = _poll(lambda: self.client.request("GET", url).json(), timeout, 0.5, progress, f"assign {req['id'][:8]}")
        if req["status"] != "succeeded":
            raise JobFailed(req)
        return _table(self.client.request("GET", req["links"]["labels"]).text, as_frame)


def verify_signature(body: bytes, header: str | None, secret: str) -> bool:
    """True when ``header`` (a callback's ``X-SP2OT-Signature``) signs the raw ``body`` with
    ``secret`` (:meth:`Client.callback_secret`); compared in constant time."""
    import hashlib
    import hmac

    expected = "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return header is not None and hmac.compare_digest(header.encode("utf-8"), expected.encode("utf-8"))


# ------------------------------------------------------------------------------ helpers
def _raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        detail = r.json().get("detail") or r.text
    except ValueError:
        detail = r.text
    raise ServiceError(r.status_code, str(detail))


def _poll(read, timeout: float | None, poll: float, progress: bool, desc: str) -> dict:
    """Read until the status is final; a bar of the percent with the stage as its postfix."""
    from tqdm.auto import tqdm

    deadline = None if timeout is None else time.monotonic() + timeout
    bar = tqdm(total=100.0, desc=desc, disable=not progress, bar_format="{desc}: {percentage:3.0f}%|{bar}| "
               "{postfix} [{elapsed}]")
    try:
        while True:
            info = read()
            p = info.get("progress") or {}
            done = info["status"] in FINAL
            pct = 100.0 if info["status"] == "succeeded" else float(p.get("percent") or 0.0)
            bar.set_postfix_str(str(p.get("stage") or info["status"]), refresh=False)
            bar.update(max(0.0, pct - bar.n))
            if done:
                return info
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{desc} is still {info['status']} after {timeout} s")
            time.sleep(poll)
    finally:
        bar.close()


def _table(text: str, as_frame: bool | None):
    if as_frame is not False:
        try:
            import pandas as pd
        except ImportError:
            if as_frame:
                raise
        else:
            return pd.read_csv(io.StringIO(text), keep_default_na=False, dtype={"filename": str})
    rows = list(csv.DictReader(io.StringIO(text)))
    for row in rows:
        row["cluster"] = int(row["cluster"])
        row["confidence"] = float(row["confidence"])
        # the flags: empty for a job clustered before they existed
        if row.get("outlier_score"):
            row["outlier_score"] = float(row["outlier_score"])
        if row.get("outlier"):
            row["outlier"] = row["outlier"] == "true"
    return rows


@contextmanager
def _nothing():
    yield None


@contextmanager
def _archive_of(path: str | os.PathLike):
    """``(open binary file, name)`` of an archive, or of a folder zipped into a temporary file
    (removed afterwards)."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            yield f, path.name
        return
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither an archive nor a folder")
    with tempfile.TemporaryFile(suffix=".zip") as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:  # images are compressed already
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                zf.write(file, file.relative_to(path).as_posix())
        tmp.seek(0)
        yield tmp, f"{path.name or 'images'}.zip"
