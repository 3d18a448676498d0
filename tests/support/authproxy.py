"""A TLS front with basic auth for a real server the tests start (the schema registry), as
managed registries sit behind one: the client under test must send the credentials and
trust the front's CA."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import aiohttp
from aiohttp import web

from callstream.localtls import ensure_tls_files
from callstream.ports import free_port


class AuthProxy:
    def __init__(self, upstream: str, tls_dir: Path, user: str, password: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.tls = ensure_tls_files(tls_dir)
        self._expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.refused = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}{self.upstream_path}"

    @property
    def upstream_path(self) -> str:
        return "/" + self.upstream.split("/", 3)[3] if self.upstream.count("/") >= 3 else ""

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls.keystore)
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=context).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != self._expected:
            self.refused += 1
            return web.json_response({"error_code": 401, "message": "Unauthorized"}, status=401)
        assert self._session is not None
        origin = self.upstream.split("/", 3)
        target = f"{origin[0]}//{origin[2]}{request.path_qs}"
        async with self._session.request(
            request.method,
            target,
            data=await request.read(),
            headers={k: v for k, v in request.headers.items() if k.lower() == "content-type"},
        ) as upstream:
            return web.Response(
                status=upstream.status,
                body=await upstream.read(),
                content_type=upstream.content_type,
            )
