"""Errors the service layer raises, each mapped to one HTTP status by the app."""

from __future__ import annotations


class ApiError(Exception):
    """A request the controller refuses; `status` is the HTTP status code it answers with."""

    status = 400

    def __init__(self, message: str, *, field: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        """Location of the offending field ("body", "endpoint", ...) for 422 answers."""

    def detail(self) -> object:
        if self.status == 422:
            # Same shape as FastAPI's own validation errors, so clients parse one format.
            return [{"loc": list(self.field), "msg": self.message, "type": "value_error"}]
        return self.message


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class Unprocessable(ApiError):
    status = 422


class Forbidden(ApiError):
    status = 403
