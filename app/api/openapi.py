"""The OpenAPI document as the contract: the answers described as they are sent.

FastAPI describes a validation error as its ``HTTPValidationError`` (``detail`` a list); this
service answers ``{"detail": "...", "errors": [...]}`` (``detail`` a sentence). :func:`contract`
rewrites the generated document once:

* every error answer (4xx, 5xx) of every operation is ``ErrorOut`` (``ValidationErrorOut`` for
  422, ``ServerErrorOut`` for 500); FastAPI's ``HTTPValidationError`` is gone;
* an operation that reads parameters or a body documents 422, one with a JSON body 400 (a body
  that is not JSON at all), every operation 500 (with the request id to report);
* the operations that need a key declare the ``bearer`` security scheme and 401; the creating
  uploads document 429 (the per-key limits, ``app.api.fairness``).
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.schemas import ErrorOut, ServerErrorOut, ValidationErrorOut

PUBLIC_PREFIXES = ("/health",)  # answered without a key
RATE_LIMITED = {("post", "/jobs"), ("post", "/datasets")}
_MODELS = {"ErrorOut": ErrorOut, "ValidationErrorOut": ValidationErrorOut, "ServerErrorOut": ServerErrorOut}
_FASTAPI_ERRORS = ("HTTPValidationError", "ValidationError")
_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _answer(model: str, description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}}}


def _document(op: dict[str, Any], method: str, path: str) -> None:
    responses = op.setdefault("responses", {})
    for code, answer in list(responses.items()):
        if code[:1] in ("4", "5") and code not in ("422", "500"):
            responses[code] = _answer("ErrorOut", answer.get("description") or "Error")
    content = op.get("requestBody", {}).get("content", {})
    if op.get("parameters") or content or "422" in responses:
        responses["422"] = _answer("ValidationErrorOut", (responses.get("422") or {}).get("description")
                                   or "Invalid request: the message names the field and what to fix")
    if "application/json" in content:
        responses.setdefault("400", _answer("ErrorOut", "The body is not JSON"))
    if not path.startswith(PUBLIC_PREFIXES):
        op["security"] = [{"bearer": []}]
        responses.setdefault("401", _answer("ErrorOut", "Missing or invalid API key"))
    if (method, path) in RATE_LIMITED:
        answer = _answer("ErrorOut", "A per-key limit is reached (active jobs, upload bytes per hour); "
                                     "retry after the seconds of Retry-After")
        answer["headers"] = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}
        responses["429"] = answer
    responses["500"] = _answer("ServerErrorOut", "Unexpected server error (logged with its request id)")


def contract(app: FastAPI) -> dict[str, Any]:
    """``app.openapi()`` of this service (cached on the app)."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in _FASTAPI_ERRORS:
        schemas.pop(name, None)
    for name, model in _MODELS.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}))
        schemas[name] = body
    components["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "An API key (`sp2ot create-api-key NAME`); without SP2OT_AUTH_REQUIRED, local clients "
                       "may omit it."}}
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if method in _METHODS:
                _document(op, method, path)
    app.openapi_schema = doc
    return doc
