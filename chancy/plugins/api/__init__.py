"""The dashboard (``pip install chancy[web]``): an HTML UI and a JSON API under
``/api/v1/``, served by :class:`Api` inside a worker or by ``chancy worker web``."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any

from chancy.errors import ConfigurationError
from chancy.plugin import Plugin
from chancy.plugins.api.auth import AuthBackend, DjangoAuth, PasswordAuth, hash_password

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from chancy.app import Chancy
    from chancy.worker import Worker

__all__ = ["Api", "AuthBackend", "DjangoAuth", "PasswordAuth", "create_app", "hash_password"]


def is_loopback(host: str) -> bool:
    """True if ``host`` names only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(
    chancy: Chancy,
    *,
    auth: AuthBackend | None,
    secret_key: str | bytes | None = None,
    session_max_age: int = 12 * 3600,
    manage_pool: bool = False,
) -> ASGIApp:
    """The dashboard as an ASGI application (to mount in your own server). ``auth=None``
    serves it without login: only do that behind your own authentication. With
    ``manage_pool`` the app's lifespan opens and closes ``chancy``'s async pool."""
    from chancy.plugins.api.app import Dashboard

    return Dashboard(
        chancy,
        auth=auth,
        secret_key=secret_key,
        session_max_age=session_max_age,
        manage_pool=manage_pool,
    ).app()


class Api(Plugin):
    """Serves the dashboard from a worker on ``host:port`` (loopback by default).

    Give ``users`` (name -> password or :func:`hash_password` hash) or an ``auth``
    backend such as :class:`DjangoAuth`. Without either, the dashboard runs without
    login, which is refused on a non-loopback address unless
    ``allow_remote_without_auth=True``.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        users: Mapping[str, str] | None = None,
        auth: AuthBackend | None = None,
        secret_key: str | bytes | None = None,
        allow_remote_without_auth: bool = False,
        log_level: str = "warning",
    ) -> None:
        if users and auth is not None:
            raise ConfigurationError("give the dashboard users or an auth backend, not both")
        if auth is not None and not isinstance(auth, AuthBackend):
            raise ConfigurationError("auth must have an async authenticate(username, password)")
        self.auth: AuthBackend | None = PasswordAuth(users) if users else auth
        if self.auth is None and not is_loopback(host) and not allow_remote_without_auth:
            raise ConfigurationError(
                f"refusing to serve the dashboard on {host} without authentication: give "
                "users or auth, bind 127.0.0.1, or pass allow_remote_without_auth=True"
            )
        if not 0 <= port <= 65535:
            raise ConfigurationError("port must be between 0 and 65535")
        self.host = host
        self.port = port
        self.secret_key = secret_key
        self.log_level = log_level
        #: The bound (host, port) once serving (port 0 picks a free one).
        self.bound: tuple[str, int] | None = None
        self.started = asyncio.Event()

    @classmethod
    def get_identifier(cls) -> str:
        return "chancy.api"

    async def run(self, worker: Worker, chancy: Chancy) -> None:
        await self.serve(chancy, stop=worker.stopping)

    async def serve(self, chancy: Chancy, *, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set (used by the plugin and ``chancy worker web``)."""
        import uvicorn

        app = create_app(chancy, auth=self.auth, secret_key=self.secret_key)
        sock = self._bind()
        config = uvicorn.Config(
            app,
            log_level=self.log_level,
            lifespan="off",
            proxy_headers=True,
            server_header=False,
            access_log=False,
        )
        server = _Server(config)
        self.bound = sock.getsockname()[:2]
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        stopping = asyncio.create_task(stop.wait())
        up = asyncio.create_task(server.up.wait())
        try:
            await asyncio.wait({serving, stopping, up}, return_when=asyncio.FIRST_COMPLETED)
            if up.done():
                self.started.set()
                await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
            server.should_exit = True
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            sock.close()
            self.started.clear()

    def _bind(self) -> socket.socket:
        # Bound here so that a busy port raises OSError (uvicorn would exit the process).
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host.strip("[]"), self.port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.setblocking(False)
        logging.getLogger("chancy.web").info("dashboard on http://%s:%d/", *sock.getsockname()[:2])
        return sock


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server without its signal handlers: the worker (or the CLI) owns
        SIGTERM/SIGINT and stops the dashboard itself."""

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.up = asyncio.Event()

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            self.up.set()

        def install_signal_handlers(self) -> None:
            return None

        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            yield

    return Server


def _Server(config: Any) -> Any:
    return _server_class()(config)
