"""HTTP errors as OpenAI shapes them: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from edge_vlm.errors import BadImage, BadInput, ContextOverflow


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def too_large(message: str) -> ApiError:
    return ApiError(413, message, code="request_too_large")


def from_edge_error(e: Exception) -> ApiError:
    """edge-vlm's typed errors -> the HTTP error a client can act on."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ContextOverflow):
        return ApiError(400, str(e).replace("--max-tokens", "max_tokens").replace(
            "raise --n-ctx", "start the server with a larger --n-ctx"), code="context_length_exceeded",
            param="messages")
    if isinstance(e, BadImage):
        return ApiError(400, str(e), code="invalid_image", param="messages")
    if isinstance(e, BadInput):
        return ApiError(400, str(e), code="invalid_value")
    return ApiError(500, f"the model failed on this request ({type(e).__name__}: {str(e)[:200]}); the server "
                         "goes on serving others", type_="server_error", code="internal_error")
