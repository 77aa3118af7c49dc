"""What the layers built on the Store need from the app object: a store and a service list.

``Cache`` and ``WSRouter`` take the app's :class:`~zeal_asgi.Zeal` to run in every worker; they
see it through :class:`ServiceHost`, so nothing below the app layer imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from zeal_asgi.store.facade import Store


class Service(Protocol):
    """A per-worker background component started and stopped with the app (GC, subscribers)."""

    async def start(self) -> None:
        """Start in the current worker's event loop."""
        ...

    async def stop(self) -> None:
        """Stop and await every task it started."""
        ...


class ServiceHost(Protocol):
    """The app object (:class:`~zeal_asgi.Zeal`): its store, and services run in every worker."""

    @property
    def store(self) -> Store:
        """The store every service of the app uses."""
        ...

    def add_service(self, service: Service) -> None:
        """Start ``service`` in every worker at startup, stop it at shutdown."""
        ...
