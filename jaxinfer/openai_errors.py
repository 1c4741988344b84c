"""OpenAI-format errors: `ApiError` (status, message, type, param, code, headers) and its JSON body;
request bodies parsed with pydantic in strict mode, each validation error turned into one OpenAI
error that names the offending field (`parse_request`)."""

from __future__ import annotations

import json

import pydantic

from jaxinfer.protocol import UNSUPPORTED_FIELDS
from jaxinfer.protocol_responses import ErrorInfo, ErrorResponse

# What a field must be, for union-typed fields whose pydantic errors list every alternative.
_FIELD_HINTS = {
    "prompt": "must be a non-empty string, a non-empty list of token ids, or a list of either",
    "stop": "must be a non-empty string or a list of non-empty strings",
    "content": "must be a string or a list of {'type': 'text', 'text': ...} parts",
}


class ApiError(Exception):
    """A refused request: HTTP status plus the OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code)).model_dump()


def _param_path(loc: tuple, body) -> tuple[str, bool]:
    """('messages', 0, 'content', 'str') -> ('messages[0].content', True): the path through the
    request body, without pydantic's union-member tags (the bool: some were dropped)."""
    out, cur, tagged = "", body, False
    for i, part in enumerate(loc):
        following = loc[i + 1] if i + 1 < len(loc) else None
        if isinstance(cur, dict) and part == cur.get("type") and following in cur:
            tagged = True  # a discriminated union's tag (its "type"), even where a field has its name
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            out, cur = out + f"[{part}]", cur[part]
        elif isinstance(cur, dict) and isinstance(part, str) and (part in cur or part.isidentifier()):
            out = f"{out}.{part}" if out else part
            if part not in cur:  # a missing field: nothing below it
                break
            cur = cur[part]
        else:
            tagged = True
    return out, tagged


def _pydantic_error(e: pydantic.ValidationError, body: dict) -> ApiError:
    first = e.errors(include_url=False)[0]
    param, tagged = _param_path(first["loc"], body)
    leaf = param.rsplit(".", 1)[-1].split("[")[0]
    if first["type"] == "extra_forbidden":
        message = f"unknown field {param!r}; remove it (see GET /openapi.json for the accepted fields)"
    elif first["type"] == "missing":
        message = f"{param} is required"
    elif tagged and leaf in _FIELD_HINTS:
        message = f"{param} {_FIELD_HINTS[leaf]}"
    else:
        got = repr(first.get("input"))
        msg = first["msg"].removeprefix("Value error, ")  # (a validator's own message)
        message = f"{param}: {msg} (got {got[:80] + '...' if len(got) > 80 else got})"
    return ApiError(400, message, param=param)


def parse_request(raw: bytes, model: type[pydantic.BaseModel]) -> pydantic.BaseModel:
    """Body bytes -> validated request, or ApiError(400) naming what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start}); send UTF-8 JSON") from None

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    for field, unused in UNSUPPORTED_FIELDS.items():
        if field in body and body[field] not in unused:
            raise ApiError(400, f"{field} is not supported by this server; remove it", param=field)
        body.pop(field, None)
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as e:
        raise _pydantic_error(e, body) from None
