"""The policy API's one error shape: every client mistake is a 4xx JSON body
{"error": {"status", "code", "message", "field"[, "details"]}} that names the part of the request at fault."""

from fastapi.responses import JSONResponse
from pydantic import ValidationError


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 details: list | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.details, self.headers = (
            status, code, message, field, details, headers)

    def response(self) -> JSONResponse:
        err = {"status": self.status, "code": self.code, "message": self.message, "field": self.field}
        if self.details:
            err["details"] = self.details
        return JSONResponse({"error": err}, status_code=self.status, headers=self.headers)


def schema_error(exc: ValidationError) -> APIError:
    """A request that fails its pydantic schema -> 422 naming the first bad field, with one detail per problem."""
    details = []
    for e in exc.errors(include_url=False, include_input=False, include_context=False):
        field = ".".join(str(p) for p in e["loc"]) or "body"
        details.append({"field": field, "message": e["msg"].removeprefix("Value error, ")})
    first = details[0]
    more = f" (+{len(details) - 1} more)" if len(details) > 1 else ""
    return APIError(422, "invalid_request", f"{first['field']}: {first['message']}{more}", first["field"], details)
