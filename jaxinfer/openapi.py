"""The server's OpenAPI 3.1 description, built from the pydantic request and response models."""

from __future__ import annotations


def openapi_spec(config) -> dict:
    """OpenAPI 3.1 description for a server of `config` (a `http_app.ServerConfig`: its API key
    decides whether the /v1 routes declare bearer security)."""
    from pydantic.json_schema import models_json_schema

    from jaxinfer import protocol as p
    from jaxinfer import protocol_responses as r

    models = [p.CompletionRequest, p.ChatCompletionRequest, r.CompletionResponse, r.ChatCompletionResponse,
              r.ChatCompletionChunk, r.ModelList, r.ErrorResponse, r.Health]
    _, top = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    ref = lambda name: {"$ref": f"#/components/schemas/{name}"}  # noqa: E731
    error = {"description": "OpenAI-style error", "content": {"application/json": {"schema": ref("ErrorResponse")}}}
    errors = {str(s): error for s in (400, 401, 404, 413, 415, 429, 503)}

    def sse_event(chunk):  # OpenAPI 3.1: a text/event-stream schema describes each event
        return {"type": "object", "required": ["data"], "properties": {
            "event": {"type": "string"}, "id": {"type": "string"},
            "data": {"anyOf": [
                {"const": "[DONE]", "description": "the last event"},
                {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [ref(chunk), ref("ErrorResponse")]},
                 "description": "a chunk, or an error body if the engine stopped mid-stream"}]}}}

    def generate(req, resp, chunk):
        return {"post": {
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref(req)}}},
            "responses": {"200": {"description": "the completion (JSON), or server-sent events with stream: true",
                                  "content": {"application/json": {"schema": ref(resp)},
                                              "text/event-stream": {"schema": sse_event(chunk)}}}, **errors},
            **({"security": [{"bearer": []}]} if config.api_key else {})}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "jaxinfer OpenAI-compatible API", "version": "1"},
        "paths": {
            "/v1/completions": generate("CompletionRequest", "CompletionResponse", "CompletionResponse"),
            "/v1/chat/completions": generate("ChatCompletionRequest", "ChatCompletionResponse",
                                             "ChatCompletionChunk"),
            "/v1/models": {"get": {"responses": {
                "200": {"description": "served models", "content": {"application/json": {"schema": ref("ModelList")}}},
                "401": error}, **({"security": [{"bearer": []}]} if config.api_key else {})}},
            "/health": {"get": {"responses": {
                "200": {"description": "serving", "content": {"application/json": {"schema": ref("Health")}}},
                "503": {"description": "draining or stopped",
                        "content": {"application/json": {"schema": ref("Health")}}}}}},
            "/metrics": {"get": {"responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
        "components": {"schemas": top.get("$defs", {}),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
