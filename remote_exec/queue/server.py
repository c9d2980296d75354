"""The queue server over HTTPS (aiohttp): the routes of docs/pull-protocol.md, the
long-polls, streamed files and the sweep.

Only this module imports aiohttp. The state lives in :class:`~remote_exec.queue.store.Store`
(SQLite + spool); what this module keeps in memory are wake-up signals: a long-poll
(``GET /runs/{id}?wait``, ``POST /site/claim``) waits on a future that the store's
listener resolves when the run (or a run of the site) changes, then reads the database
again. Nothing is polled, and a restart loses nothing.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from remote_exec.errors import ConfigError
from remote_exec.queue import compat, schemas
from remote_exec.queue.errors import ApiError, bad_request
from remote_exec.queue.paths import path_problem
from remote_exec.queue.settings import Settings
from remote_exec.queue.store import JSON_MAX, LOG_CHUNK_MAX, Principal, Store, Upload

SERVER_VERSION = "1"
CHUNK = 1024 * 1024
WRITE_BUFFER = 1024 * 1024
DRAIN_RETRY_AFTER = 5
DEFAULT_QUEUE_TIMEOUT = 1800.0
log = logging.getLogger("remote_exec.queue")

_STATUS_CODES = {400: "bad_request", 404: "not_found", 405: "bad_request",
                 413: "too_large", 411: "length_required"}


class Notifier:
    """Futures to resolve when something changes, by key (``("run", id)``, ``("site", s)``)."""

    def __init__(self) -> None:
        self._waiters: dict[tuple[str, str], set[asyncio.Future[None]]] = {}

    async def wait(self, key: tuple[str, str], timeout: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, set()).add(future)
        try:
            await asyncio.wait_for(future, max(timeout, 0))
        except asyncio.TimeoutError:
            pass
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(future)
                if not waiters:
                    del self._waiters[key]

    def notify(self, key: tuple[str, str]) -> None:
        for future in self._waiters.pop(key, ()):
            if not future.done():
                future.set_result(None)

    def notify_all(self) -> None:
        for key in list(self._waiters):
            self.notify(key)


def error_response(err: ApiError) -> web.Response:
    headers = {}
    if err.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="remote-exec queue"' + (
            ', error="invalid_token"' if err.code != "unauthenticated" else "")
    if "retry_after" in err.extra:
        headers["Retry-After"] = str(err.extra["retry_after"])
    return web.json_response(err.body(), status=err.status, headers=headers)


class QueueApp:
    """The routes and their shared state (settings, store, notifier, draining flag)."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.notifier = Notifier()
        self.draining = False
        store.listener = self._changed

    def _changed(self, run_id: str, site: str) -> None:
        self.notifier.notify(("run", run_id))
        self.notifier.notify(("site", site))

    # -- the application ----------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=JSON_MAX)
        app.on_response_prepare.append(self._stamp)
        p = self.settings.prefix
        r = app.router
        r.add_get(p + "/healthz", self.healthz)
        r.add_post(p + "/runs", self.create_run)
        r.add_get(p + "/runs", self.list_runs)
        r.add_put(p + r"/runs/{id}/inputs/{path:[\s\S]+}", self.put_input)
        r.add_post(p + "/runs/{id}/submit", self.submit)
        r.add_get(p + "/runs/{id}", self.get_run)
        r.add_get(p + "/runs/{id}/log", self.get_log)
        r.add_get(p + r"/runs/{id}/outputs/{path:[\s\S]+}", self.get_output)
        r.add_post(p + "/runs/{id}/cancel", self.cancel)
        r.add_delete(p + "/runs/{id}", self.delete)
        r.add_get(p + "/sites/{site}", self.site_info)
        r.add_post(p + "/site/claim", self.claim)
        r.add_get(p + r"/site/jobs/{id}/inputs/{path:[\s\S]+}", self.get_input)
        r.add_post(p + "/site/jobs/{id}/events", self.event)
        r.add_post(p + "/site/jobs/{id}/log", self.post_log)
        r.add_put(p + r"/site/jobs/{id}/outputs/{path:[\s\S]+}", self.put_output)
        r.add_post(p + "/site/jobs/{id}/finish", self.finish)
        if self.settings.compat.enabled:
            compat.CompatV0(self.settings.compat, self.store).add_routes(r)
        return app

    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-RE-Server-Version"] = SERVER_VERSION

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.draining and not request.path.endswith("/healthz"):
            return error_response(ApiError(503, "draining", "the queue server is shutting "
                                           "down: try again shortly",
                                           retry_after=DRAIN_RETRY_AFTER))
        try:
            return await handler(request)
        except ApiError as err:
            if err.status >= 500:
                log.warning("%s %s: %s %s", request.method, request.path, err.status, err.code)
            return error_response(err)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = _STATUS_CODES.get(exc.status, f"http_{exc.status}")
            return error_response(ApiError(exc.status, code, exc.reason or code))
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return error_response(ApiError(500, "internal", "the queue server failed on this "
                                           "call (see its log); try again"))

    # -- helpers ------------------------------------------------------------------------

    def _who(self, request: web.Request, role: str) -> Principal:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        who = self.store.authenticate(token.strip() if scheme.lower() == "bearer" else None)
        if who.role != role:
            raise ApiError(403, "forbidden", f"this call needs a {role} token; this one is a "
                           f"{who.role} token")
        if role == "site" and self.settings.client_ca is not None:
            names = _cert_names(request)
            if who.site not in names:
                raise ApiError(403, "forbidden", f"the client certificate (names: "
                               f"{', '.join(sorted(names)) or 'none'}) is not the certificate "
                               f"of site {who.site}")
        return who

    async def _json(self, request: web.Request, validate: Any, empty_ok: bool = False) -> Any:
        raw = await request.read()
        if not raw.strip() and empty_ok:
            return validate({})
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise bad_request("the body is not a JSON object (UTF-8)") from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        return validate(body)

    def _file_path(self, request: web.Request, skip: int) -> str:
        """The file path of the URL (after ``skip`` segments past the prefix), decoded and
        checked by the protocol's one rule."""
        raw = request.raw_path.split("?", 1)[0][len(self.settings.prefix):]
        try:
            path = unquote("/".join(raw.split("/")[1 + skip:]), errors="strict")
        except UnicodeDecodeError:
            raise bad_request("the file path is not valid UTF-8 once decoded") from None
        problem = path_problem(path)
        if problem:
            raise bad_request(f"file path {path!r}: {problem}")
        return path

    def _file_headers(self, request: web.Request) -> tuple[int, str]:
        size = request.content_length
        if size is None:
            raise ApiError(411, "length_required", "a file body needs a Content-Length "
                           "header (chunked uploads are not accepted)")
        digest = request.headers.get("X-RE-SHA256", "").strip()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise bad_request("a file body needs X-RE-SHA256: its sha256 as 64 lowercase hex")
        return size, digest

    def _check_space(self, size: int) -> None:
        free = shutil.disk_usage(self.store.dir).free
        if free - size < self.settings.min_free_space:
            raise ApiError(507, "no_space", f"the queue server's spool has {free} bytes free; "
                           f"{size} more would leave less than min_free_space "
                           f"({self.settings.min_free_space}): try later or ask its "
                           "administrator to free space")

    async def _receive(self, request: web.Request, upload: Upload) -> Path:
        """Stream the body to a temporary file, checking its size and sha256. Pieces of up
        to WRITE_BUFFER bytes are hashed and written in a worker thread, so that a large
        upload neither holds memory nor stalls the other calls."""
        temp = self.store.temp_file()
        digest = hashlib.sha256()
        received = 0
        loop = asyncio.get_running_loop()

        def write(f: Any, data: bytes) -> None:
            digest.update(data)
            f.write(data)

        try:
            with open(temp, "wb") as f:
                buffer = bytearray()
                while True:
                    chunk = await request.content.readany()
                    received += len(chunk)
                    if received > upload.size:
                        raise bad_request("the body is longer than its Content-Length")
                    buffer += chunk
                    if len(buffer) >= WRITE_BUFFER or (not chunk and buffer):
                        await loop.run_in_executor(None, write, f, bytes(buffer))
                        buffer.clear()
                    if not chunk:
                        break
                if received != upload.size:
                    raise bad_request(f"the body ended after {received} of {upload.size} bytes")
                if digest.hexdigest() != upload.sha256:
                    raise ApiError(422, "digest_mismatch", f"the body's sha256 is "
                                   f"{digest.hexdigest()}, not {upload.sha256} (X-RE-SHA256): "
                                   "send the file again")
                f.flush()
                await loop.run_in_executor(None, os.fsync, f.fileno())
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp

    async def _put(self, request: web.Request, who: Principal, upload: Upload,
                   lease: str | None = None) -> web.Response:
        answer = {"size": upload.size, "sha256": upload.sha256}
        if upload.already:
            return web.json_response(answer, status=200)
        self._check_space(upload.size)
        temp = await self._receive(request, upload)
        try:
            self.store.commit_upload(who, upload, temp, lease)
        finally:
            temp.unlink(missing_ok=True)
        return web.json_response(answer, status=201)

    @staticmethod
    async def _send_file(request: web.Request, path: Path,
                         sha256: str) -> web.StreamResponse:
        """``path`` streamed in CHUNK blocks (read off the loop; each write waits for
        the socket), from ``Range: bytes=N-[M]`` if asked. Not web.FileResponse: over
        TLS its sendfile falls back to 16 KiB rounds, several times slower."""
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise ApiError(404, "not_found", "the file is missing from the spool") from None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            start, stop = 0, size
            headers = {"X-RE-SHA256": sha256, "Content-Type": "application/octet-stream",
                       "Accept-Ranges": "bytes"}
            status = 200
            if request.headers.get("Range"):
                try:
                    wanted = request.http_range
                except ValueError:
                    raise ApiError(416, "bad_range", "the Range header is not bytes=N-[M]") \
                        from None
                start = wanted.start or 0
                stop = size if wanted.stop is None else min(wanted.stop, size)
                if start >= size and size:
                    raise ApiError(416, "bad_range", f"the file has {size} bytes")
                status = 206
                headers["Content-Range"] = f"bytes {start}-{max(stop - 1, start)}/{size}"
            headers["Content-Length"] = str(max(stop - start, 0))
            response = web.StreamResponse(status=status, headers=headers)
            await response.prepare(request)
            handle.seek(start)
            remaining = stop - start
            while remaining > 0:
                chunk = await asyncio.to_thread(handle.read, min(CHUNK, remaining))
                if not chunk:
                    break
                await response.write(chunk)
                remaining -= len(chunk)
            await response.write_eof()
            return response

    @staticmethod
    def _number(request: web.Request, name: str, default: float | None,
                integer: bool = False) -> float | None:
        text = request.query.get(name)
        if text is None or text == "":
            return default
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise bad_request(f"?{name}= must be a number (got {text!r})") from None
        if value < 0 or value != value:
            raise bad_request(f"?{name}= must be 0 or more")
        return value

    # -- submit role --------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def create_run(self, request: web.Request) -> web.Response:
        who = self._who(request, "submit")
        body = await self._json(request, schemas.validate_create)
        compat.check_create(self.settings.compat, body)
        status, answer = self.store.create_run(who, body, DEFAULT_QUEUE_TIMEOUT,
                                               self.settings.site_entrypoints)
        return web.json_response(answer, status=status)

    async def put_input(self, request: web.Request) -> web.Response:
        who = self._who(request, "submit")
        path = self._file_path(request, 3)
        size, digest = self._file_headers(request)
        upload = self.store.input_upload(who, request.match_info["id"], path, size, digest)
        return await self._put(request, who, upload)

    async def submit(self, request: web.Request) -> web.Response:
        who = self._who(request, "submit")
        await self._json(request, schemas.validate_empty, empty_ok=True)
        return web.json_response(self.store.submit(who, request.match_info["id"]))

    async def get_run(self, request: web.Request) -> web.Response:
        who = self._who(request, "submit")
        run_id = request.match_info["id"]
        wait = min(self._number(request, "wait", 0.0) or 0.0, self.settings.claim_wait_max)
        after = self._number(request, "after", None, integer=True)
        deadline = time.monotonic() + wait
        while True:
            run = self.store.get_run(who, run_id)
            remaining = deadline - time.monotonic()
            if after is None or run["version"] > after or remaining <= 0 or self.draining:
                return web.json_response(run)
            await self.notifier.wait(("run", run_id), remaining)

    async def get_log(self, request: web.Request) -> web.Response:
        who = self._who(request, "submit")
        offset = int(self._number(request, "offset", 0, integer=True) or 0)
        data, size, final = self.store.read_log(who, request.match_info["id"], offset)
        headers = {"X-RE-Log-Size": str(size)}
        if final:
            headers["X-RE-Log-Final"] = "1"
        return web.Response(body=data, headers=headers, content_type="application/octet-stream")

    async def get_output(self, request: web.Request) -> web.StreamResponse:
        who = self._who(request, "submit")
        path = self._file_path(request, 3)
        file, entry = self.store.output_file(who, request.match_info["id"], path)
        return await self._send_file(request, file, entry["sha256"])

    async def cancel(self, request: web.Request) -> web.Response:
        who = self._who(request, "submit")
        await self._json(request, schemas.validate_empty, empty_ok=True)
        status, answer = self.store.cancel(who, request.match_info["id"])
        return web.json_response(answer, status=status)

    async def delete(self, request: web.Request) -> web.Response:
        who = self._who(request, "submit")
        self.store.delete(who, request.match_info["id"])
        return web.Response(status=204)

    async def list_runs(self, request: web.Request) -> web.Response:
        who = self._who(request, "submit")
        runs = self.store.list_runs(who, request.query.get("site"), request.query.get("state"))
        return web.json_response({"runs": runs})

    async def site_info(self, request: web.Request) -> web.Response:
        who = self._who(request, "submit")
        return web.json_response(self.store.site_info(who, request.match_info["site"]))

    # -- site role ----------------------------------------------------------------------

    async def claim(self, request: web.Request) -> web.Response:
        who = self._who(request, "site")
        body = await self._json(request, schemas.validate_claim)
        wait = min(float(body.get("wait", 0)), self.settings.claim_wait_max)
        deadline = time.monotonic() + wait
        while True:
            transport = request.transport
            if transport is None or transport.is_closing():
                return web.Response(status=204)  # the poller left: hand it nothing
            job = self.store.claim(who, body["poller"], body.get("entrypoints"))
            if job is not None:
                return web.json_response({"job": job})
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.draining:
                return web.Response(status=204)
            await self.notifier.wait(("site", who.site), remaining)

    async def get_input(self, request: web.Request) -> web.StreamResponse:
        who = self._who(request, "site")
        path = self._file_path(request, 4)
        file, entry = self.store.lease_input(who, request.match_info["id"],
                                             request.headers.get("X-RE-Lease"), path)
        return await self._send_file(request, file, entry["sha256"])

    async def event(self, request: web.Request) -> web.Response:
        who = self._who(request, "site")
        body = await self._json(request, schemas.validate_event)
        return web.json_response(self.store.event(who, request.match_info["id"], body))

    async def post_log(self, request: web.Request) -> web.Response:
        who = self._who(request, "site")
        offset = self._number(request, "offset", None, integer=True)
        if offset is None:
            raise bad_request("?offset= is required: where in the log the body starts")
        if request.content_length is not None and request.content_length > LOG_CHUNK_MAX:
            raise ApiError(413, "too_large", f"send the log in pieces of at most "
                           f"{LOG_CHUNK_MAX} bytes")
        data = await request.read()
        if len(data) > LOG_CHUNK_MAX:
            raise ApiError(413, "too_large", f"send the log in pieces of at most "
                           f"{LOG_CHUNK_MAX} bytes")
        size = self.store.append_log(who, request.match_info["id"],
                                     request.headers.get("X-RE-Lease"), int(offset), data)
        return web.json_response({"log_size": size})

    async def put_output(self, request: web.Request) -> web.Response:
        who = self._who(request, "site")
        path = self._file_path(request, 4)
        size, digest = self._file_headers(request)
        lease = request.headers.get("X-RE-Lease")
        upload = self.store.output_upload(who, request.match_info["id"], lease, path, size,
                                          digest)
        return await self._put(request, who, upload, lease)

    async def finish(self, request: web.Request) -> web.Response:
        who = self._who(request, "site")
        body = await self._json(request, schemas.validate_finish)
        return web.json_response(self.store.finish(who, request.match_info["id"], body))

    # -- the sweep ----------------------------------------------------------------------

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                self.store.sweep()
            except Exception:
                log.exception("sweep failed")


def _cert_names(request: web.Request) -> set[str]:
    """The CN and subjectAltNames of the client's certificate."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport else None
    names: set[str] = set()
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(value)
    for _kind, value in (cert or {}).get("subjectAltName", ()):
        names.add(value)
    return names


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context; a ConfigError naming the file at fault."""
    if settings.plain_http:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for what, path in (("tls.cert", settings.cert), ("tls.key", settings.key),
                       ("tls.client_ca", settings.client_ca)):
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"{what}: cannot read {path}",
                              hint="check the path (relative to the configuration file) "
                              "and its permissions")
    try:
        context.load_cert_chain(str(settings.cert), str(settings.key))
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"tls: cannot load the certificate {settings.cert} with the key "
                          f"{settings.key}: {err}",
                          hint="both must be PEM files, the key matching the certificate") \
            from None
    if settings.client_ca is not None:
        try:
            context.load_verify_locations(str(settings.client_ca))
        except (ssl.SSLError, OSError) as err:
            raise ConfigError(f"tls.client_ca: cannot load {settings.client_ca}: {err}",
                              hint="a PEM file of the CA that signs the clients' "
                              "certificates") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def bind(settings: Settings) -> socket.socket:
    """The listening socket; a ConfigError if the address is taken or not ours."""
    try:
        infos = socket.getaddrinfo(settings.host or None, settings.port,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ConfigError(f"listen: cannot resolve {settings.host!r}: {err}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(f"listen: {settings.host}:{settings.port} is in use by another "
                              "program", hint="stop it, or choose another port in `listen`"
                              " (port 0 picks a free one)") from None
        raise ConfigError(f"listen: cannot listen on {settings.host}:{settings.port}: "
                          f"{err.strerror}") from None
    sock.setblocking(False)
    return sock


def _setup_logging(state_dir: Path) -> None:
    handler = logging.FileHandler(state_dir / "queue.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.getLogger("aiohttp").addHandler(handler)


def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT (ConfigError for what stops it from starting)."""
    context = ssl_context(settings)
    store = Store(settings.state_dir, lease_ttl=settings.lease_ttl,
                  lost_after=settings.lost_after, max_file_size=settings.max_file_size,
                  max_run_bytes=settings.max_run_bytes)
    sock = bind(settings)
    _setup_logging(settings.state_dir)
    try:
        asyncio.run(_serve(settings, store, sock, context))
    finally:
        store.close()


async def _serve(settings: Settings, store: Store, sock: socket.socket,
                 context: ssl.SSLContext | None) -> None:
    queue = QueueApp(settings, store)
    access = logging.getLogger("remote_exec.queue.access")
    runner = web.AppRunner(queue.make_app(), access_log=access,
                           access_log_format='%a "%r" %s %b %Tfs', shutdown_timeout=3)
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=context).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"remote-exec queue: listening on {settings.scheme}://{shown}:{port}{settings.prefix}",
          flush=True)
    log.info("listening on %s:%s (pid %s)", host, port, os.getpid())
    store.sweep()
    sweeper = asyncio.create_task(queue.sweep_forever())
    await stop.wait()
    log.info("stopping: ending long-polls")
    queue.draining = True
    queue.notifier.notify_all()
    sweeper.cancel()
    await runner.cleanup()
    log.info("stopped")
    print("remote-exec queue: stopped", file=sys.stderr, flush=True)
