"""A value returned by a FastAPI endpoint, rendered as that route renders it (imported lazily).

This follows the non-streaming branch of FastAPI's request handler: the response model
(``response_model_include`` / ``exclude`` / ``by_alias`` / ``exclude_*``), the response class
(with FastAPI's direct-to-JSON path for the default class), the route's status code or the one
set on the ``Response`` parameter, and the headers and cookies set on that parameter.  The test
suite compares the bytes with the same route served without the decorator.
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi.datastructures import DefaultPlaceholder
from fastapi.routing import APIRoute, serialize_response
from fastapi.utils import is_body_allowed_for_status_code
from starlette.responses import Response

_DUMP_JSON = "dump_json" in inspect.signature(serialize_response).parameters


def is_api_route(route: object) -> bool:
    """Whether the matched route is a FastAPI path operation."""
    return isinstance(route, APIRoute)


async def render_value(route: Any, value: Any, sub: Response | None) -> Response:
    """The response ``route`` sends for ``value`` (``sub``: its ``Response`` parameter)."""
    assert isinstance(route, APIRoute)
    status = route.status_code or (sub.status_code if sub is not None else None)
    if sub is not None and sub.status_code:
        status = sub.status_code
    args: dict[str, Any] = {"status_code": status} if status is not None else {}
    cls = route.response_class
    default = isinstance(cls, DefaultPlaceholder)
    actual: type[Response] = cls.value if isinstance(cls, DefaultPlaceholder) else cls
    dump_json = _DUMP_JSON and route.response_field is not None and default
    extra: dict[str, Any] = {"dump_json": True} if dump_json else {}
    content = await serialize_response(
        field=route.response_field,
        response_content=value,
        include=route.response_model_include,
        exclude=route.response_model_exclude,
        by_alias=route.response_model_by_alias,
        exclude_unset=route.response_model_exclude_unset,
        exclude_defaults=route.response_model_exclude_defaults,
        exclude_none=route.response_model_exclude_none,
        is_coroutine=True,
        **extra,
    )
    if dump_json:
        response = Response(content=content, media_type="application/json", **args)
    else:
        response = actual(content, **args)
    if not is_body_allowed_for_status_code(response.status_code):
        response.body = b""
    if sub is not None:
        response.headers.raw.extend(sub.headers.raw)
    return response
