"""Completion callbacks: a job's callback_url receives the job's JSON, signed with the key's
callback secret, once the job succeeded, failed or was cancelled; a receiver's 500 is retried;
hosts not in SP2OT_CALLBACK_ALLOWED_HOSTS are refused (422 naming the setting). Through the real
Celery worker (PostgreSQL, Redis) and the embedded worker, to a receiver on 127.0.0.1."""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    CALLBACK_ENV,
    ENGINE_OPTIONS,
    api_client,
    auth,
    image_set,
    make_zip,
    service_env,
    settings_from,
    upload_job,
    wait_for,
)

pytest_plugins = ["service_fixtures"]


class Receiver:
    """A tiny HTTP server on 127.0.0.1 recording every POST (path, headers, body); it answers
    the statuses of ``answers`` in turn, then 200."""

    def __init__(self, answers=()):
        self.calls: list[dict] = []
        self.answers = list(answers)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.calls.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def wait(self, path: str, n: int = 1, timeout: float = 120) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            calls = [c for c in self.calls if c["path"] == path]
            if len(calls) >= n:
                return calls
            time.sleep(0.1)
        raise AssertionError(f"{len(self.calls)} call(s) to the receiver, {n} to {path} expected: {self.calls}")


def signature_ok(call: dict, secret: str) -> bool:
    """What a receiver does: the HMAC-SHA256 of the raw body, compared in constant time."""
    expected = "sha256=" + hmac.new(secret.encode(), call["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(call["headers"]["X-SP2OT-Signature"], expected)


def test_callback_signed_and_retried_through_the_worker(celery_stack):
    c, key = celery_stack["client"], celery_stack["key"]
    secret = c.get("/callback-secret", headers=auth(key)).json()["secret"]
    with Receiver(answers=[500]) as rx:
        r = upload_job(c, key, make_zip(image_set(12)), n_clusters=3, callback_url=f"{rx.url}/done?x=1",
                       **ENGINE_OPTIONS)
        assert r.status_code == 202, r.text
        assert r.json()["callback"] == {"url": f"{rx.url}/done?x=1", "status": "pending", "attempts": 0,
                                        "error": None}
        job_id = r.json()["id"]
        first, second = rx.wait("/done?x=1", n=2)  # the 500 is retried
    for call, attempt in ((first, "1"), (second, "2")):
        assert signature_ok(call, secret), call["headers"]
        assert call["headers"]["X-SP2OT-Delivery-Attempt"] == attempt and call["headers"]["X-SP2OT-Job"] == job_id
    body = json.loads(second["body"])
    assert body["id"] == job_id and body["status"] == "succeeded" and body["summary"]["n_images"] == 12
    # the same JSON as GET /jobs/{id}, and a forged body does not verify
    assert not signature_ok({**second, "body": second["body"].replace(b"succeeded", b"failed")}, secret)
    job = wait_for(c, key, job_id, predicate=lambda j: j["callback"]["status"] != "pending",
                   statuses=())
    assert job["callback"] == {"url": f"{rx.url}/done?x=1", "status": "sent", "attempts": 2, "error": None}
    time.sleep(1)
    assert len(rx.calls) == 2  # delivered once it was answered 2xx: no more posts


def test_callbacks_on_failure_and_cancel_and_give_up(celery_stack):
    c, key = celery_stack["client"], celery_stack["key"]
    secret = c.get("/callback-secret", headers=auth(key)).json()["secret"]
    images = image_set(6)
    broken = {n: data[:70] for n, data in images.items()}  # headers fine, pixel data cut: the worker fails it
    with Receiver(answers=[503] * 10) as down, Receiver() as rx:
        failed = upload_job(c, key, make_zip(broken), n_clusters=3, callback_url=f"{rx.url}/failed",
                            **ENGINE_OPTIONS).json()
        cancelled = upload_job(c, key, make_zip(image_set(12)), n_clusters=3, callback_url=f"{rx.url}/cancelled",
                               **ENGINE_OPTIONS).json()
        c.post(f"/jobs/{cancelled['id']}/cancel", headers=auth(key))
        unanswered = upload_job(c, key, make_zip(image_set(9)), n_clusters=3, callback_url=f"{down.url}/x",
                                **ENGINE_OPTIONS).json()
        (f_call,) = rx.wait("/failed")
        (c_call,) = rx.wait("/cancelled")
        assert json.loads(f_call["body"])["status"] == "failed" and signature_ok(f_call, secret)
        assert json.loads(c_call["body"])["status"] == "cancelled" and signature_ok(c_call, secret)
        job = wait_for(c, key, unanswered["id"], statuses=(), timeout=180,
                       predicate=lambda j: j["callback"]["status"] != "pending")
    attempts = int(CALLBACK_ATTEMPTS)
    assert job["callback"]["status"] == "failed" and job["callback"]["attempts"] == attempts
    assert len(down.calls) == attempts and f"gave up after {attempts} attempts" in job["callback"]["error"]


CALLBACK_ATTEMPTS = "4"  # the default SP2OT_CALLBACK_ATTEMPTS


def test_callback_url_refused_unless_its_host_is_allowed(celery_stack, tmp_path):
    c, key = celery_stack["client"], celery_stack["key"]
    total = c.get("/jobs", headers=auth(key)).json()["total"]
    job_dirs = sorted((celery_stack["data_dir"] / "jobs").iterdir())
    for url, says in (("http://example.com/hook", "'example.com' is not allowed by SP2OT_CALLBACK_ALLOWED_HOSTS"),
                      ("http://127.0.0.1.example.com/", "is not allowed by SP2OT_CALLBACK_ALLOWED_HOSTS"),
                      ("ftp://127.0.0.1/x", "is not an http:// or https:// URL"),
                      ("http://127.0.0.1:99999/x", "is not an http:// or https:// URL")):
        r = upload_job(c, key, make_zip(image_set(6)), n_clusters=3, callback_url=url)
        assert r.status_code == 422 and says in r.json()["detail"], (url, r.text)
    r = c.post("/jobs", json={"dataset_id": "x", "n_clusters": 3, "callback_url": "http://10.0.0.1/"},
               headers=auth(key))
    assert r.status_code == 422 and "SP2OT_CALLBACK_ALLOWED_HOSTS" in r.json()["detail"]
    assert c.get("/jobs", headers=auth(key)).json()["total"] == total  # nothing created
    assert sorted((celery_stack["data_dir"] / "jobs").iterdir()) == job_dirs

    # no allowed host: callbacks are disabled, and the answer says which setting enables them
    settings = settings_from(service_env(data_dir=tmp_path))
    with api_client(settings) as local:
        r = upload_job(local, None, make_zip(image_set(6)), n_clusters=3, callback_url="http://127.0.0.1/x")
        assert r.status_code == 422 and "callbacks are disabled" in r.json()["detail"]
        assert "SP2OT_CALLBACK_ALLOWED_HOSTS" in r.json()["detail"]


def test_embedded_worker_delivers_callbacks(tmp_path, monkeypatch):
    monkeypatch.setenv("SP2OT_FAKE_STEP_DELAY", "0.01")
    settings = settings_from(service_env(data_dir=tmp_path, estimator="service_fixtures:FakeClustering",
                                         **CALLBACK_ENV))
    with Receiver(answers=[500]) as rx, api_client(settings) as c:
        secret = c.get("/callback-secret").json()["secret"]
        r = upload_job(c, None, make_zip(image_set(9)), n_clusters=3, epochs=1, callback_url=f"{rx.url}/e")
        assert r.status_code == 202, r.text
        first, second = rx.wait("/e", n=2, timeout=30)
        assert signature_ok(second, secret) and json.loads(second["body"])["status"] == "succeeded"
