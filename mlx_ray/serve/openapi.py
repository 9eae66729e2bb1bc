"""The OpenAPI document of the ingress's routes: the request bodies it validates itself.

The routes read the raw body and validate it with the request models (so every
error gets OpenAI's body and the taxonomy's status, never FastAPI's 422), which
leaves FastAPI nothing to document. This puts the models' JSON schemas into
``/openapi.json`` as the routes' request bodies, so clients and fuzzers
(schemathesis in the tests) see the real shapes and ranges.
"""

from __future__ import annotations

from typing import Optional

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from . import openai_protocol as oai

REQUEST_BODIES = {"/v1/chat/completions": oai.ChatCompletionRequest, "/v1/completions": oai.CompletionRequest}
_REF = "#/components/schemas/{model}"


def request_body(path: str) -> Optional[dict]:
    """``openapi_extra`` of the route at ``path``: its JSON request body, by reference."""
    model = REQUEST_BODIES.get(path)
    if model is None:
        return None
    ref = {"$ref": _REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def document_request_bodies(app: FastAPI) -> None:
    """Add the request models (and the models they use) to the app's ``components.schemas``."""
    _, defs = models_json_schema([(m, "validation") for m in REQUEST_BODIES.values()], ref_template=_REF)
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = build()
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
