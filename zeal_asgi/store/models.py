"""Table schemas derived from pydantic models, and the model's limits on rows written as dicts."""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Union, cast, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError

from zeal_asgi.errors import (
    BackendResponseError,
    ColumnTypeError,
    ModelValidationError,
    SchemaError,
)
from zeal_asgi.shm.schema import ColumnType

if TYPE_CHECKING:
    from zeal_asgi.store.base import TableSpec


def _int_size(lo: int | None, hi: int | None) -> int:
    if lo is None or hi is None:
        return 8
    for size in (1, 2, 4, 8):
        bits = size * 8
        if -(2 ** (bits - 1)) <= lo and hi <= 2 ** (bits - 1) - 1:
            return size
    raise SchemaError(f"range [{lo}, {hi}] does not fit a signed 64-bit INT column")


def columns_from_model(model: type[BaseModel]) -> dict[str, tuple[ColumnType, int]]:
    """Columns for ``Store.make(..., model=User)``.

    ``int`` with ``Field(ge=, le=)`` becomes the smallest INT that holds the range (else INT(8));
    ``float`` becomes FLOAT; ``str`` with ``max_length`` becomes STRING of that many UTF-8 bytes
    (4 bytes per character: the limit must hold any string pydantic accepts); ``bytes`` with
    ``max_length`` becomes BYTES.  Anything else is a SchemaError naming the field.
    """
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise SchemaError(f"model must be a pydantic BaseModel subclass, got {model!r}")
    cols: dict[str, tuple[ColumnType, int]] = {}
    for name, info in model.model_fields.items():
        ann: Any = info.annotation
        if get_origin(ann) in (Union, types.UnionType):
            raise SchemaError(
                f"{model.__name__}.{name}: optional/union fields have no column type "
                "(shared rows always hold a value)"
            )
        lo = hi = max_len = None
        for m in info.metadata:
            lo = getattr(m, "ge", lo)
            hi = getattr(m, "le", hi)
            if getattr(m, "gt", None) is not None:
                lo = m.gt + 1
            if getattr(m, "lt", None) is not None:
                hi = m.lt - 1
            max_len = getattr(m, "max_length", max_len)
        if ann is bool:
            raise SchemaError(f"{model.__name__}.{name}: bool is not a column type (use int 0/1)")
        if ann is int:
            cols[name] = (ColumnType.INT, _int_size(lo, hi))
        elif ann is float:
            cols[name] = (ColumnType.FLOAT, 8)
        elif ann in (str, bytes):
            if max_len is None:
                raise SchemaError(
                    f"{model.__name__}.{name}: {ann.__name__} needs Field(max_length=...) to size "
                    "its column"
                )
            kind, per_unit = (ColumnType.STRING, 4) if ann is str else (ColumnType.BYTES, 1)
            cols[name] = (kind, int(max_len) * per_unit)
        else:
            raise SchemaError(
                f"{model.__name__}.{name}: type {ann!r} has no column type (int, float, str, bytes)"
            )
    return cols


@functools.cache
def _fields(model: type[BaseModel]) -> dict[str, TypeAdapter[Any]]:
    """One validator per field, with the field's constraints (``ge``, ``max_length``, ...)."""
    return {
        name: TypeAdapter(cast(Any, Annotated)[info.annotation, info])
        for name, info in model.model_fields.items()
    }


def row_of(spec: TableSpec, row: object) -> Mapping[str, Any]:
    """``row`` (a mapping, or a pydantic model) as the mapping to write to ``spec``.

    A mapping written to a table made from a model is checked against the model's limits too
    (after the table's own typed checks), so a dict cannot store what the model would refuse.
    """
    if isinstance(row, BaseModel):
        return row.model_dump()
    if not isinstance(row, Mapping):
        raise ColumnTypeError(
            f"a row is a mapping of column -> value or a pydantic model, got {type(row).__name__}"
        )
    if spec.model is not None:
        fields = _fields(spec.model)
        for name, value in spec.schema.validate_row(row, spec.name).items():
            try:
                fields[name].validate_python(value)
            except ValidationError as exc:
                raise ModelValidationError(
                    f"column {name!r} of table {spec.name!r} ({spec.model.__name__}.{name}): "
                    f"{exc.errors()[0]['msg']}"
                ) from None
    return row


def model_of(spec: TableSpec, key: object, row: Mapping[str, Any]) -> BaseModel:
    """The stored ``row`` as the table's model; BackendResponseError when it does not validate."""
    assert spec.model is not None
    try:
        return spec.model.model_validate(row)
    except ValidationError as exc:
        raise BackendResponseError(
            f"stored row {key!r} of table {spec.name!r} is not a valid {spec.model.__name__} "
            f"(written by another program or before the model changed?): {exc}"
        ) from None
