"""Errors as OpenAI's API returns them, `{"error": {"message", "type", "param", "code"}}`, so OpenAI clients
raise their usual exceptions with compllm's message; each message says what to change."""
from __future__ import annotations

from typing import Any, Optional


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None,
                 extra: Optional[dict[str, Any]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}
        self.extra = extra or {}  # more top-level fields of the body (a 504's partial answer)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code},
                **self.extra}


def bad_request(message: str, param: Optional[str] = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_error(errors: list[dict[str, Any]], fields: frozenset[str]) -> APIError:
    """pydantic's first complaint, with the field path (`messages.0.content`) as `param`: list indexes and the
    request's `fields`, not the union members pydantic tried (`str`, `list[TextPart]`)."""
    first = errors[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if isinstance(p, int) or p in fields) or None
    if first.get("type") == "missing":
        return bad_request(f"'{param}' is required: send a JSON object such as "
                           '{"model": ..., "messages": [{"role": "user", "content": "your question"}]}',
                           param, "missing_required_parameter")
    got = first.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    return bad_request(f"'{param}': {first.get('msg', 'invalid value')} (got {shown[:80]})", param)
