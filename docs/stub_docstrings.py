"""Griffe extension of the docs build: the compiled extension's classes, documented.

``Table`` and ``Atomic`` are typed by the stub ``zeal_asgi/shm/_shmtable.pyi``; their prose lives in
the compiled module. This extension

- turns a re-export written as an assignment (``Table = _shmtable.Table``) into an alias of
  the stub's class, so the public name shows the class;
- copies each docstring from the imported compiled module onto the stub object of the same
  name, where the stub has none;
- renders the docstrings' Sphinx roles (``:class:`Zeal```) as code spans.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import griffe

STUB = "zeal_asgi.shm._shmtable"
_STUB_NAME = STUB.rpartition(".")[2]
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`~?([^`]+)`")


class StubDocstrings(griffe.Extension):
    """Link the public names to the stub and fill the stub's docstrings."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Runs once the whole package is loaded."""
        if pkg.path != "zeal_asgi":
            return
        stub: Any = pkg
        for part in STUB.split(".")[1:]:
            if part not in stub.modules:
                return
            stub = stub.modules[part]
        _fill(stub, importlib.import_module(STUB))
        for module in _modules(pkg):
            for name, member in list(module.members.items()):
                if member.is_alias or not member.is_attribute:
                    continue
                value = str(getattr(member, "value", "") or "").replace(" ", "")
                target = value.removeprefix(f"{_STUB_NAME}.")
                if value.startswith(f"{_STUB_NAME}.") and target in stub.members:
                    module.set_member(name, griffe.Alias(name, stub.members[target], parent=module))
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)


def _modules(module: griffe.Module) -> list[griffe.Module]:
    found = [module]
    for sub in module.modules.values():
        if not sub.is_alias:
            found += _modules(sub)
    return found


def _objects(obj: griffe.Object) -> list[griffe.Object]:
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias and isinstance(member, griffe.Object):
            found += _objects(member)
    return found


def _doc(runtime: Any) -> str:
    # A "Raises:" entry naming several exceptions wraps after a comma; one line parses.
    return re.sub(r",\n[ \t]+", ", ", inspect.getdoc(runtime) or "")


def _fill(obj: griffe.Object, runtime: Any) -> None:
    doc = _doc(runtime)
    if obj.docstring is None and doc:
        obj.docstring = griffe.Docstring(doc, parent=obj)
    for name, member in obj.members.items():
        if name.startswith("_") or member.is_alias or not isinstance(member, griffe.Object):
            continue
        static = inspect.getattr_static(runtime, name, None)
        if static is None:
            continue
        if member.is_class:
            _fill(member, getattr(runtime, name))
        elif member.docstring is None and (doc := _doc(static)):
            # Methods and properties: the docstring sits on the descriptor.
            member.docstring = griffe.Docstring(doc, parent=member)
