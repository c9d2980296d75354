"""``compat_v0``: the queue server also speaks MInt's original site protocol, so that a
site still running MInt's poller (``mi-system-remote.py``) keeps working while it moves
to ``remote_exec_poller.py``. Opt-in (``compat_v0.enabled``), same listener and TLS,
under ``compat_v0.prefix`` (``/mi-distcomp-api``: the original poller calls
``<base url>:<port>/mi-distcomp-api/<call>``).

The seven calls of the original poller, on top of the same store and state machine as
protocol v1 (docs/pull-protocol.md, appendix "compat_v0"):

=========================  ====================================================================
``GET calc-request``       a non-blocking claim of the oldest queued run of the site whose
                           entrypoint is the site's ``compat_v0`` entrypoint: code 200 and
                           ``accept_id`` (the run id), or code ``"0300"`` when there is none
``GET calc-params``        claimed -> staging; ``{"calc-info": {...}}`` (not wrapped): the
                           configured command, the inputs as base64 (binary, byte-exact) and
                           the run's returns that are plain names as ``result_files``
``POST calc-params-complete``  staging -> staged
``POST calc-start``        staged -> launching -> running
``POST calc-end``          running -> uploading; ``"calc end"`` is exit code 0, ``"abnormal"``
                           1, anything else code 402
``POST send-results``      the files, base64-decoded and hashed, become the run's outputs; the
                           two stdout/stderr files its log (stdout first, also the output
                           ``remote_program_exec.log`` as with remote_exec_poller.py);
                           ``Error`` entries are named in the run's message
``POST end-send``          uploading -> finished (exited, with calc-end's exit code)
=========================  ====================================================================

Answers use the original envelope ``{"errors": [{"message": ..., "code": ...}]}``, HTTP
200 even for most errors (as the original, whose gateway mangled 400s); a missing or
wrong token (not a site token of ``site_id``) is HTTP 403 code ``"0005"`` as MInt's
gateway answered. Limits: see README "Sites still running MInt's original poller".
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
from pathlib import Path
from typing import Any

from aiohttp import web

# the name of a run's log: it travels as the log, never as a result file
from remote_exec.inputs import LOG_NAME
from remote_exec.queue.errors import ApiError, bad_request
from remote_exec.queue.paths import path_problem
from remote_exec.queue.settings import CompatSettings, CompatSite
from remote_exec.queue.store import Store

#: the two result files the original poller always adds (its command's stdout, stderr)
STDOUT_NAME = "計算標準出力.txt"
STDERR_NAME = "計算標準エラー出力.txt"
#: mime type and charset of every input: the original poller then writes it as binary
BINARY = ["application/octet-stream;", "charset=binary"]
#: room in a send-results body beyond the base64 of max_job_bytes (JSON, names)
BODY_SLACK = 4 * 1024 * 1024
SMALL_BODY = 1024 * 1024


def plain_name(pattern: str) -> str | None:
    """The file name a returns entry stands for when it is a plain name (possibly
    ``glob.escape``-d: ``[*]``, ``[?]``, ``[[]``), None for a real pattern."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "[" and i + 2 < len(pattern) and pattern[i + 2] == "]" \
                and pattern[i + 1] in "*?[":
            out.append(pattern[i + 1])
            i += 3
            continue
        if c in "*?[":
            return None
        out.append(c)
        i += 1
    return "".join(out)


def result_names(returns: list[str]) -> list[str]:
    """The ``result_files`` the original poller is asked for: the plain names of
    ``returns`` (patterns cannot be expressed), without the log and the two files it
    always adds."""
    names: list[str] = []
    for pattern in returns:
        name = plain_name(pattern)
        if name and name not in (LOG_NAME, STDOUT_NAME, STDERR_NAME) and name not in names \
                and path_problem(name) is None:
            names.append(name)
    return names


def served(compat: CompatSettings, body: dict[str, Any]) -> CompatSite | None:
    """The compat_v0 site a new run goes to, if an original poller may take it."""
    if not compat.enabled:
        return None
    site = compat.sites.get(body["site"])
    if site is None or body["entrypoint"] != site.entrypoint:
        return None
    return site


def check_create(compat: CompatSettings, body: dict[str, Any]) -> None:
    """Refuse at ``POST /runs`` a run an original poller could not carry. Runs of a
    compat_v0 site with another entrypoint are not checked: they wait for a v1 poller."""
    if served(compat, body) is None:
        return
    who = (f"site {body['site']} is served to MInt's original poller (compat_v0, "
           f"entrypoint {body['entrypoint']!r})")
    inputs = body.get("inputs", [])
    total = sum(int(item["size"]) for item in inputs)
    if total > compat.max_job_bytes:
        raise ApiError(413, "too_large", f"{who}, which receives a run's inputs as one base64 "
                       f"JSON document held in memory: these inputs ({total} bytes) exceed "
                       f"compat_v0.max_job_bytes ({compat.max_job_bytes} bytes); send smaller "
                       "inputs, or move the site to remote_exec_poller.py")
    nested = [item["path"] for item in inputs if "/" in item["path"]]
    if nested:
        raise bad_request(f"{who}, which keeps only the last part of an input's name: inputs "
                          f"in directories cannot be sent ({', '.join(nested[:5])})")
    if not result_names(body.get("returns", [])):
        raise bad_request(f"{who}, which returns only files named exactly and reports failure "
                          "when none is named: name the result files (e.g. remote-exec "
                          "legacy-pull ... OUT1:OUT2); patterns such as '**' cannot be "
                          "expressed")


def envelope(message: str, code: int | str, status: int = 200,
             **extra: Any) -> web.Response:
    return web.json_response({"errors": [{"message": message, "code": code, **extra}]},
                             status=status)


def _forbidden(path: str, why: str) -> ApiError:
    return ApiError(403, "0005", f"{path} への実行権がありません。 ({why})")


class CompatV0:
    """The seven site calls of the original protocol, for one QueueApp."""

    def __init__(self, compat: CompatSettings, store: Store) -> None:
        self.compat = compat
        self.store = store

    def add_routes(self, router: web.UrlDispatcher) -> None:
        p = self.compat.prefix
        router.add_get(p + "/calc-request", self._call(self.calc_request))
        router.add_get(p + "/calc-params", self._call(self.calc_params))
        router.add_post(p + "/calc-params-complete", self._call(self.calc_params_complete))
        router.add_post(p + "/calc-start", self._call(self.calc_start))
        router.add_post(p + "/calc-end", self._call(self.calc_end))
        router.add_post(p + "/send-results", self._call(self.send_results))
        router.add_post(p + "/end-send", self._call(self.end_send))

    @staticmethod
    def _call(handler: Any) -> Any:
        async def call(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except ApiError as err:
                code: int | str = err.code if err.status in (200, 403) else str(err.status)
                return envelope(err.message, code, err.status)
        return call

    # -- helpers ----------------------------------------------------------------------------

    def _site(self, request: web.Request, site_id: Any) -> tuple[str, CompatSite]:
        """The caller's site: ``Authorization: Bearer`` must be a site token of
        ``site_id`` (403 "0005" otherwise, as MInt's gateway), and ``site_id`` a compat_v0
        site (code "400" otherwise, as the original)."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        try:
            who = self.store.authenticate(token.strip() if scheme.lower() == "bearer" else None)
        except ApiError as err:
            raise _forbidden(request.path, err.message) from None
        if who.role != "site":
            raise _forbidden(request.path, f"a {who.role} token, not a site token")
        site = self.compat.sites.get(site_id) if isinstance(site_id, str) else None
        if site is None:
            raise ApiError(200, "400", f"site-id({site_id})は受け入れ可能なIDリストにありません。"
                           " (not a compat_v0 site of the queue server)")
        if who.site != site_id:
            raise _forbidden(request.path, f"this token is a token of site {who.site}, not "
                             f"of {site_id}")
        return site_id, site

    async def _json(self, request: web.Request, cap: int = SMALL_BODY) -> dict[str, Any]:
        if request.content_length is not None and request.content_length > cap:
            raise ApiError(413, "too_large", f"the body ({request.content_length} bytes) is "
                           f"larger than this server takes ({cap} bytes; compat_v0."
                           "max_job_bytes)")
        data = bytearray()
        while True:
            chunk = await request.content.readany()
            if not chunk:
                break
            data += chunk
            if len(data) > cap:
                raise ApiError(413, "too_large", f"the body is larger than this server "
                               f"takes ({cap} bytes; compat_v0.max_job_bytes)")
        try:
            body = json.loads(bytes(data).decode("utf-8")) if data.strip() else {}
        except (UnicodeDecodeError, ValueError):
            raise ApiError(400, "400", "the body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "400", "the body must be a JSON object")
        return body

    def _ids(self, request: web.Request, body: dict[str, Any]) -> tuple[Any, str]:
        site_id = body.get("site_id", request.query.get("site_id"))
        accept_id = body.get("accept_id", request.query.get("accept_id"))
        return site_id, accept_id if isinstance(accept_id, str) else ""

    @staticmethod
    def _ok() -> web.Response:
        return envelope("ok", 200)

    # -- the calls --------------------------------------------------------------------------

    async def calc_request(self, request: web.Request) -> web.Response:
        site_id, site = self._site(request, request.query.get("site_id"))
        run_id = self.store.compat_claim(site_id, site.entrypoint, request.remote or "?",
                                         self.compat.lease_ttl, self.compat.reoffer_after)
        if run_id is None:
            return envelope(f"計算可能な情報はありません。 (no run waiting for site {site_id})",
                            "0300")
        return envelope("計算可能な情報があります。", 200, accept_id=run_id)

    async def calc_params(self, request: web.Request) -> web.Response:
        site_id, site = self._site(request, request.query.get("site_id"))
        run_id = request.query.get("accept_id", "")
        inputs, returns = self.store.compat_params(site_id, run_id, self.compat.lease_ttl)

        def build() -> bytes:
            files = {}
            for path, spooled in inputs:
                try:
                    data = spooled.read_bytes()
                except OSError:
                    raise ApiError(200, "400", f"calc-params: input {path!r} of run {run_id} "
                                   "is missing from the queue server's spool") from None
                files[path] = [base64.b64encode(data).decode("ascii"), *BINARY]
            info = {"command": site.command, "remote-site": site_id, "parameters": "",
                    "parameter_files": files,
                    "result_files": {name: {"content": "", "mimetype1": "", "mimetype2": ""}
                                     for name in result_names(returns)}}
            return json.dumps({"calc-info": info}, ensure_ascii=False).encode("utf-8")

        body = await asyncio.get_running_loop().run_in_executor(None, build)
        return web.Response(body=body, content_type="application/json", charset="utf-8")

    async def calc_params_complete(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        site_id, accept_id = self._ids(request, body)
        site_id, _site = self._site(request, site_id)
        self.store.compat_step(site_id, accept_id, self.compat.lease_ttl,
                               "calc-params-complete")
        return self._ok()

    async def calc_start(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        site_id, accept_id = self._ids(request, body)
        site_id, _site = self._site(request, site_id)
        self.store.compat_step(site_id, accept_id, self.compat.lease_ttl, "calc-start")
        return self._ok()

    async def calc_end(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        site_id, accept_id = self._ids(request, body)
        site_id, _site = self._site(request, site_id)
        result = body.get("result")
        codes = {"calc end": 0, "abnormal": 1}
        if result not in codes:
            raise ApiError(200, 402, f"calc-end: result must be 'calc end' or 'abnormal' "
                           f"(got {result!r})")
        self.store.compat_end(site_id, accept_id, self.compat.lease_ttl, codes[result])
        return self._ok()

    async def send_results(self, request: web.Request) -> web.Response:
        cap = self.compat.max_job_bytes * 4 // 3 + BODY_SLACK
        body = await self._json(request, cap)
        site_id, accept_id = self._ids(request, body)
        site_id, _site = self._site(request, site_id)
        entries = body.get("result_files")
        if not isinstance(entries, dict):
            raise ApiError(200, "400", "send-results: result_files must be an object")
        wanted = set(result_names(self.store.returns_of(accept_id)))
        temps: list[Path] = []

        def decode() -> tuple[list[tuple[str, int, str, Path]], tuple[int, Path] | None,
                              list[str]]:
            files: list[tuple[str, int, str, Path]] = []
            missing, ignored, bad = [], [], []
            log: dict[str, bytes] = {}
            for name, entry in entries.items():
                if not isinstance(entry, dict):
                    bad.append(name)
                    continue
                if entry.get("mimetype1") == "Error":
                    if name not in (STDOUT_NAME, STDERR_NAME):
                        missing.append(name)
                    continue
                try:
                    data = base64.b64decode(entry.get("content") or "", validate=True)
                except (binascii.Error, ValueError, TypeError):
                    bad.append(name)
                    continue
                if name in (STDOUT_NAME, STDERR_NAME):
                    log[name] = data
                    continue
                if name not in wanted:
                    ignored.append(name)
                    continue
                if len(data) > self.store.max_file_size:
                    bad.append(f"{name} (larger than max_file_size)")
                    continue
                temp = self.store.temp_file()
                temps.append(temp)
                temp.write_bytes(data)
                files.append((name, len(data), hashlib.sha256(data).hexdigest(), temp))
            notes = []
            if missing:
                notes.append("result file(s) missing on the site: " + ", ".join(missing))
            if bad:
                notes.append("result file(s) not valid base64, refused: " + ", ".join(bad))
            if ignored:
                notes.append("result file(s) not asked for, ignored: " + ", ".join(ignored))
            kept = None
            if log:
                temp = self.store.temp_file()
                temps.append(temp)
                data = log.get(STDOUT_NAME, b"") + log.get(STDERR_NAME, b"")
                temp.write_bytes(data)
                kept = (len(data), temp)
                # and, as remote_exec_poller.py does, the log file among the outputs
                copy = self.store.temp_file()
                temps.append(copy)
                copy.write_bytes(data)
                files.append((LOG_NAME, len(data), hashlib.sha256(data).hexdigest(), copy))
            return files, kept, notes

        try:
            files, log, notes = await asyncio.get_running_loop().run_in_executor(None, decode)
            self.store.compat_results(site_id, accept_id, self.compat.lease_ttl, files, log,
                                      notes)
        finally:
            for temp in temps:
                temp.unlink(missing_ok=True)  # (moved into place when recorded)
        return self._ok()

    async def end_send(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        site_id, accept_id = self._ids(request, body)
        site_id, _site = self._site(request, site_id)
        self.store.compat_finish(site_id, accept_id, self.compat.lease_ttl)
        return self._ok()

