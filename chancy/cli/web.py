"""``chancy worker web``: serve the dashboard (``pip install chancy[web]``)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal

import click

from chancy.app import Chancy
from chancy.cli.context import CliState, fail, pass_state, run_with_app


@click.command("web")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port."
)
@click.option(
    "--username",
    envvar="CHANCY_WEB_USERNAME",
    default="admin",
    show_default=True,
    help="Dashboard user name (env CHANCY_WEB_USERNAME).",
)
@click.option(
    "--password",
    envvar="CHANCY_WEB_PASSWORD",
    help="Dashboard password (env CHANCY_WEB_PASSWORD); a random one is printed if omitted.",
)
@click.option(
    "--secret-key",
    envvar="CHANCY_WEB_SECRET_KEY",
    help="Key signing session cookies (env CHANCY_WEB_SECRET_KEY); random by default, "
    "so a restart logs everyone out.",
)
@pass_state
def web(
    state: CliState,
    host: str,
    port: int,
    username: str,
    password: str | None,
    secret_key: str | None,
) -> None:
    """Serve the dashboard until SIGTERM or SIGINT."""
    try:
        from chancy.plugins.api import Api, is_loopback
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        fail(f"the dashboard needs the web extra (pip install 'chancy[web]'): {exc}")
    state.configure_logging(default="INFO")
    if not password:
        password = secrets.token_urlsafe(12)
        click.echo(f"dashboard login: user {username!r}, generated password {password}", err=True)
    api = Api(host=host, port=port, users={username: password}, secret_key=secret_key)
    if not is_loopback(host):
        click.echo(
            f"warning: serving the dashboard on {host}: put it behind HTTPS (a TLS proxy)",
            err=True,
        )

    async def serve(chancy: Chancy) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(api.serve(chancy, stop=stop))
        started = asyncio.create_task(api.started.wait())
        await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        if api.bound is not None and not task.done():
            bound_host, bound_port = api.bound
            click.echo(f"dashboard on http://{bound_host}:{bound_port}/", err=True)
        started.cancel()
        await task

    run_with_app(state, serve)
