#!/usr/bin/env python3
"""The pull method (queue server + site poller + ``backend: pull``): start latency and
large files, against MInt's original WebAPI polling method as documented.

Everything runs on this machine: ``remote_exec.sandbox_pull.PullSandbox`` in a
temporary directory starts a queue server (a CA of its own, real TLS on 127.0.0.1) and a
poller of the site ``sandbox-pull``; the state directory and user configuration are
temporary too (REMOTE_EXEC_STATE_DIR, XDG_CONFIG_HOME). Server and poller are stopped at
the end, also on failure or Ctrl-C.

1. Start latency (``--runs N``, default 20, after one unrecorded warm-up run).
   Each run is ``remote-exec run --json --site sandbox-pull -t generic -p program=/bin/sh
   -p args=-c -p 'args=date +%s.%N > ts; cat a > out' a``, one after the other, a fresh
   process each time. ``time.time()`` is taken just before the process is started; the
   entrypoint's first action writes ``date +%s.%N`` into ``ts``, which comes back with
   the run: start latency = ts - that time (same clock, same machine). Printed: median
   and p90 of the start latency, median of the whole run's wall time, next to the
   original's documented delay from registration to start and the ratio.

   The original's delay (research note pull-mode.md, section A.2, "The site-side poller
   mi-system-remote.py" and "The MInt-side client mi-system-wf.py"), counted from the
   MInt side's ``add-calcinfo`` to the site's ``Popen`` of the command:
     15 s   mean wait for the site's next ``calc-request`` (it polls every 30 s: 0-30 s);
    + 2 s   MInt side: ``add-calcinfo`` -> sleep 2 -> ``allow-wait-calc`` (a job is
            only handed out once allowed);
    + 2 s   MInt side: ``allow-wait-calc`` -> sleep 2 -> the status loop (counted as
            asked, although it runs beside the site's poll: without it 47 s);
    +30 s   site side: ``calc-request`` -> sleep 10 -> ``calc-params`` -> sleep 10 ->
            ``calc-params-complete`` -> sleep 10 -> ``calc-start``, then ``Popen``.
    = 49 s  (range 34-64 s with the poll phase 0-30 s).
   For the whole run the note's sleeps after the command add: site ``calc-end`` -> 10 s
   -> ``send-results`` -> 10 s -> ``end-send``; MInt status loop every 10 s (mean 5 s
   until it sees ``got return``) -> sleep 2 -> ``get-calc-result``: 49 - 2 (the second
   MInt sleep overlaps) + 20 + 5 + 2 = 74 s of documented waiting per run besides the
   command and the transfers.

2. Large files (``--size``, default 1G; ``--quick``: 64M). One input ``big.in`` of
   random bytes; the entrypoint ``date +%s.%N > ts; tr '\\000-\\377' '\\001-\\377\\000'
   < big.in > big.out`` makes an output of the same size and other bytes (each byte +1
   mod 256; its sha256 is computed here beforehand and checked on the fetched file).
   One ``remote-exec run --json --into DIR`` of it. The phases come from the run's
   ``--json`` events (``elapsed``, seconds since the client's start; ``job`` events are
   the server's state changes as the client's long-poll sees them, within ms):
     in  MInt -> server   created -> staged          (PUT of the input, server fsyncs)
     in  server -> site   job "staging" -> "staged"  (the poller's GET + sha256)
     run                  job "running" -> "uploading" (tr + the poller's 1 s check)
     out site -> server   job "uploading" -> finished (the poller's sha256 + PUT)
     out server -> MInt   finished -> fetched        (GET + sha256 + placing)
   MB/s (1 MB = 10^6 bytes) both of the payload (size / phase seconds) and of the bytes
   that moved (the ``staged`` event's ``sent_bytes``, the ``fetched`` event's ``bytes``:
   everything the site sent back). Beside each phase the CPU seconds the server, the
   poller and the client used in it (``/proc/PID/stat``, sampled every 0.25 s, together
   with a ``GET /healthz`` that shows how long the server keeps a caller waiting; the
   client's clock starts a little after the Popen, so the mapping is approximate).
   Memory: VmHWM (peak resident set)
   of the queue server and of the poller from /proc/PID/status (pids from the sandbox's
   ``server.pid``/``poller.pid``) just before and just after the large run: the growth
   is what the large run added to the peak (goal < 64 MB each: PASS/FAIL); the MInt-side
   client's peak is ``wait4``'s ru_maxrss of the ``remote-exec run`` process (its
   children included), printed beside that of the latency runs (32-byte input). As a
   disk-speed reference the same input is copied with ``cp`` (and ``cp`` + ``sync FILE``)
   on the same disk.
   The original base64-encodes every file into one JSON document held in memory by all
   three processes (note, "How files travel"; documented limit 2 GiB after encoding).

Exit status 1 if a run failed or a checked file was wrong; a missed memory goal is
reported (FAIL) and also gives 1.

``--nosendfile`` starts the queue server with AIOHTTP_NOSENDFILE=1 (an experiment, see
the option's help): over TLS aiohttp's FileResponse otherwise goes through asyncio's
sendfile fallback, which sends 16 KiB per executor round-trip.

Run (PYTHONPATH pointing at the checkout if remote-exec is not installed):
    python benchmarks/pull.py --quick
    python benchmarks/pull.py                  # 20 latency runs, then 1 GiB in + 1 GiB out
    python benchmarks/pull.py --only large --size 256M
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from common import first_line, nproc, remote_exec_command, run_events

from remote_exec.sizes import parse_size, size_text

SITE = "sandbox-pull"
TIMEOUT = 3600
CHUNK = 16 * 1024 * 1024
MEM_GOAL = 64 * 10**6  # bytes of VmHWM growth, server and poller each
#: each byte + 1 mod 256, as ``tr '\000-\377' '\001-\377\000'`` does on the site
SHIFT = bytes((i + 1) % 256 for i in range(256))
TR = r"tr '\000-\377' '\001-\377\000'"

#: the original's documented waits (research note pull-mode.md, section A.2)
ORIG_POLL_MEAN = 15.0       # site polls every 30 s: mean wait 15 s
ORIG_MINT_SLEEPS = 2.0 + 2.0  # add-calcinfo, sleep 2, allow-wait-calc, sleep 2
ORIG_SITE_SLEEPS = 3 * 10.0   # calc-request ... calc-start: three sleeps of 10 s
ORIG_START = ORIG_POLL_MEAN + ORIG_MINT_SLEEPS + ORIG_SITE_SLEEPS  # 49 s
ORIG_WHOLE = ORIG_START - 2.0 + 2 * 10.0 + 5.0 + 2.0  # 74 s besides command and transfers


class Failed(Exception):
    pass


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a live process (its reaped children not counted), or NaN."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Prober(threading.Thread):
    """``GET /healthz`` of the queue server every 0.25 s (a fresh TLS connection each
    time) while the large run goes on: how long the server's event loop keeps callers
    waiting (long-polls, heartbeats, claims go through the same loop). Also samples the
    CPU seconds of the processes in ``pids`` (name -> pid, the client's added later)."""

    def __init__(self, url: str, cafile: str, pids: dict[str, int | None]) -> None:
        super().__init__(daemon=True)
        import ssl

        self.url = url + "/healthz"
        self.context = ssl.create_default_context(cafile=cafile)
        self.halt = threading.Event()
        self.times: list[float] = []
        self.errors = 0
        self.pids = pids
        self.cpu: list[tuple[float, dict[str, float]]] = []

    def run(self) -> None:
        while not self.halt.is_set():
            start = time.monotonic()
            self.cpu.append((start, {k: cpu_seconds(p) for k, p in list(self.pids.items())}))
            try:
                with urllib.request.urlopen(self.url, context=self.context,  # noqa: S310
                                            timeout=60) as answer:
                    answer.read()
                self.times.append(time.monotonic() - start)
            except OSError:
                self.errors += 1
            self.halt.wait(0.25)

    def cpu_between(self, a: float, b: float) -> dict[str, float]:
        """CPU seconds each process used between monotonic times ``a`` and ``b`` (the
        samples nearest inside)."""
        inside = [(t, c) for t, c in self.cpu if a <= t <= b]
        if len(inside) < 2:
            return {}
        first, last = inside[0][1], inside[-1][1]
        span = inside[-1][0] - inside[0][0]
        return {k: (last[k] - first.get(k, float("nan"))) / span * (b - a)
                for k in last if k in first}

    def stop(self) -> dict[str, float]:
        self.halt.set()
        self.join(70)
        t = self.times or [float("nan")]
        return {"n": len(self.times), "median": statistics.median(t), "max": max(t),
                "over_1s": sum(1 for x in self.times if x > 1.0), "errors": self.errors}


def vm_hwm(pid: int | None) -> int:
    """A live process's VmHWM in bytes (-1 if unknown)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (OSError, TypeError):
        return -1
    found = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
    return int(found.group(1)) * 1024 if found else -1


def pid_of(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile, linear between closest ranks (p90 of 20: between 18th and 19th)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class Bench:
    def __init__(self, tmp: Path, remote_exec: str | None) -> None:
        self.tmp = tmp
        self.remote_exec = remote_exec_command(remote_exec)
        self.failures: list[str] = []
        self.box: Any = None
        self.config = tmp / "remote-exec.yaml"
        self.env = dict(os.environ)
        self.counter = 0
        self.started = 0.0

    # -- the sandbox -------------------------------------------------------------------
    def up(self) -> None:
        # the sandbox (and the server and poller it starts) take these from os.environ
        os.environ["REMOTE_EXEC_STATE_DIR"] = str(self.tmp / "state")
        os.environ["XDG_CONFIG_HOME"] = str(self.tmp / "xdg-config")
        os.environ.pop("REMOTE_EXEC_CONFIG", None)
        from remote_exec.sandbox_pull import PullSandbox

        self.box = PullSandbox(self.tmp / "sandbox-pull")
        site = self.box.up()
        self.config.write_text(yaml.safe_dump({"sites": {SITE: site}}, sort_keys=False))
        self.site = site
        self.env = dict(os.environ)
        print(f"queue server {site['pull']['server']} (pid {self.pid('server')}), "
              f"poller pid {self.pid('poller')}; {nproc()} cores; "
              f"python {sys.version.split()[0]}; remote-exec: {shlex.join(self.remote_exec)}",
              flush=True)

    def down(self) -> None:
        if self.box is not None:
            self.box.down()

    def pid(self, name: str) -> int | None:
        return pid_of(self.box.dir / f"{name}.pid")

    # -- one run -----------------------------------------------------------------------
    def fresh_dir(self, kind: str) -> Path:
        self.counter += 1
        work = self.tmp / "work" / f"{self.counter:03d}-{kind}"
        work.mkdir(parents=True)
        return work

    def run(self, work: Path, script: str, inputs: list[str], *extra: str,
            watch: Prober | None = None) -> tuple[float, float, int, dict[str, dict]]:
        """``remote-exec run --json`` of ``/bin/sh -c script`` in ``work``: the time.time()
        just before the start, wall seconds, the process's peak RSS in bytes (wait4),
        its events. Failed when it exits non-zero."""
        argv = [*self.remote_exec, "run", "--config", str(self.config), "--site", SITE,
                "--json", *extra, "-t", "generic", "-p", "program=/bin/sh", "-p", "args=-c",
                "-p", f"args={script}", *inputs]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            before = time.time()
            start = time.monotonic()
            proc = subprocess.Popen(argv, cwd=work, env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err)
            self.started = start
            if watch is not None:
                watch.pids["client"] = proc.pid
            try:
                _pid, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            wall = time.monotonic() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
            err.seek(0)
            text = err.read().decode("utf-8", "replace")
        if proc.returncode != 0:
            raise Failed(f"{shlex.join(argv)} (in {work}) exited {proc.returncode}: "
                         f"{text.strip()[-1500:]}")
        try:
            events = run_events(text, argv)
        except ValueError as exc:
            raise Failed(str(exc)) from None
        events["_jobs"] = {"list": _job_events(text)}
        return before, wall, usage.ru_maxrss * 1024, events

    # -- 1. start latency ----------------------------------------------------------------
    def latency(self, runs: int) -> dict[str, Any]:
        script = "date +%s.%N > ts; cat a > out"
        starts: list[float] = []
        walls: list[float] = []
        launched: list[float] = []
        created: list[float] = []
        rss: list[int] = []
        cold: tuple[float, float] | None = None
        print(f"\n1. start latency: {runs} sequential runs after one warm-up", flush=True)
        for i in range(-1, runs):
            work = self.fresh_dir("latency")
            payload = os.urandom(16).hex()
            (work / "a").write_text(payload)
            try:
                before, wall, peak, events = self.run(work, script, ["a"])
                stamp = float((work / "ts").read_text().split()[0])
                if (work / "out").read_text() != payload:
                    raise Failed(f"{work / 'out'} is not the input")
            except (Failed, OSError, ValueError, IndexError) as exc:
                self.failures.append(f"latency run {i + 1}: {exc}")
                print(f"  run {i + 1:2d}: FAILED", flush=True)
                continue
            start = stamp - before
            if i < 0:
                cold = (start, wall)
                print(f"  warm-up: start {start:6.3f} s, wall {wall:6.3f} s", flush=True)
                continue
            starts.append(start)
            walls.append(wall)
            rss.append(peak)
            launched.append(events["launched"]["elapsed"])
            created.append(events["created"]["elapsed"])
            print(f"  run {i + 1:2d}: start {start:6.3f} s, wall {wall:6.3f} s "
                  f"(client: created at {events['created']['elapsed']:.3f} s, launched seen "
                  f"at {events['launched']['elapsed']:.3f} s)", flush=True)
        return {"starts": starts, "walls": walls, "launched": launched, "created": created,
                "rss": rss,
                "cold": cold}

    # -- 2. large files ------------------------------------------------------------------
    def large(self, size: int) -> dict[str, Any]:
        print(f"\n2. large files: {size_text(size)} in + {size_text(size)} out", flush=True)
        work = self.fresh_dir("large")
        into = work / "into"
        big = work / "big.in"
        out_digest = hashlib.sha256()
        left = size
        with open(big, "wb") as f:
            while left:
                chunk = os.urandom(min(CHUNK, left))
                out_digest.update(chunk.translate(SHIFT))
                f.write(chunk)
                left -= len(chunk)
        expected = out_digest.hexdigest()
        disk = self.disk_reference(big)
        server, poller = self.pid("server"), self.pid("poller")
        before = {"server": vm_hwm(server), "poller": vm_hwm(poller)}
        result: dict[str, Any] = {"size": size, "disk": disk, "before": before}
        prober = Prober(self.site["pull"]["server"], self.site["pull"]["ca_file"],
                        {"server": server, "poller": poller})
        prober.start()
        try:
            _t, wall, peak, events = self.run(work, f"date +%s.%N > ts; {TR} < big.in > big.out",
                                              ["big.in"], "--into", str(into), watch=prober)
        finally:
            result["after"] = {"server": vm_hwm(server), "poller": vm_hwm(poller)}
            result["healthz"] = prober.stop()
        got = _sha256(into / "big.out")
        if got != expected:
            self.failures.append(f"large run: big.out has sha256 {got}, expected {expected}")
        spans = phases(events)
        # the client's "elapsed" counts from its start: ~ the Popen (its imports earlier)
        cpu = {name: prober.cpu_between(self.started + ab[0], self.started + ab[1])
               for name, ab in spans.items() if ab is not None}
        result.update(wall=wall, client_rss=peak, cpu=cpu,
                      phases={k: (v[1] - v[0] if v else None) for k, v in spans.items()},
                      sent=events["staged"]["sent_bytes"], fetched=events["fetched"]["bytes"],
                      fetched_names=events["fetched"]["fetched"], timeline=timeline(events))
        return result

    def disk_reference(self, big: Path) -> dict[str, float]:
        """Seconds of ``cp`` of the input on the same disk, and of ``cp`` + ``sync FILE``."""
        times = {}
        for kind in ("cp", "cp + sync"):
            target = big.with_name(f"copy-{kind.replace(' ', '')}")
            start = time.monotonic()
            subprocess.run(["cp", str(big), str(target)], check=True)
            if kind == "cp + sync":
                subprocess.run(["sync", str(target)], check=True)
            times[kind] = time.monotonic() - start
            target.unlink()
        return times


def _job_events(stderr: str) -> list[dict]:
    import json

    found = []
    for line in stderr.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "job":
            found.append(record)
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except OSError as exc:
        return f"(unreadable: {exc})"
    return digest.hexdigest()


def timeline(events: dict[str, dict]) -> str:
    """``created 0.61 | staged 0.63 | claimed 0.63 | ...``: when the client saw each step."""
    steps = [("created", events["created"]["elapsed"]), ("staged", events["staged"]["elapsed"])]
    seen = set()
    for job in events["_jobs"]["list"]:
        if job.get("native") not in seen:
            seen.add(job.get("native"))
            steps.append((job.get("native", "?"), job["elapsed"]))
    for name in ("fetched", "cleaned"):
        if name in events:
            steps.append((name, events[name]["elapsed"]))
    return " | ".join(f"{name} {at:.2f}" for name, at in steps)


def phases(events: dict[str, dict]) -> dict[str, tuple[float, float] | None]:
    """(start, end) of each phase, in the client's elapsed seconds (None when not seen)."""
    first: dict[str, float] = {}
    for job in events["_jobs"]["list"]:
        first.setdefault(job.get("native", ""), job["elapsed"])

    def span(a: float | None, b: float | None) -> tuple[float, float] | None:
        return (a, b) if a is not None and b is not None else None

    return {
        "in: MInt -> server": span(events["created"]["elapsed"], events["staged"]["elapsed"]),
        "in: server -> site": span(first.get("staging"), first.get("staged")),
        "run: tr on the site": span(first.get("running"), first.get("uploading")),
        "out: site -> server": span(first.get("uploading"), events["finished"]["elapsed"]),
        "out: server -> MInt": span(events["finished"]["elapsed"], events["fetched"]["elapsed"]),
    }


# -- the report -----------------------------------------------------------------------------
def report_latency(lat: dict[str, Any]) -> None:
    starts, walls = lat["starts"], lat["walls"]
    if not starts:
        print("\nstart latency: no successful run")
        return
    med, p90 = statistics.median(starts), percentile(starts, 90)
    print(f"\nstart latency (submit -> entrypoint's first action), n = {len(starts)}")
    print(f"  pull method   median {med:6.3f} s   p90 {p90:6.3f} s   "
          f"min {min(starts):.3f} s   max {max(starts):.3f} s")
    print(f"  whole run     median {statistics.median(walls):6.3f} s   "
          f"(min {min(walls):.3f} s, max {max(walls):.3f} s)")
    print(f"  client's events (s since its start, median): created (POST /runs done) "
          f"{statistics.median(lat['created']):.3f}, launched seen "
          f"{statistics.median(lat['launched']):.3f}")
    if lat["cold"]:
        print(f"  warm-up run   start {lat['cold'][0]:.3f} s, wall {lat['cold'][1]:.3f} s "
              "(not counted)")
    print(f"  original      {ORIG_START:.0f} s expected (mean poll wait {ORIG_POLL_MEAN:.0f} s "
          f"+ MInt sleeps 2 + 2 s + site sleeps 3 x 10 s; 34-64 s; 47 s without the second "
          "MInt sleep)")
    print(f"  ratio         {ORIG_START / med:6.1f}x faster (median; "
          f"{ORIG_START / p90:.1f}x at p90)")
    print(f"  whole run vs the original's {ORIG_WHOLE:.0f} s of documented waits per run: "
          f"{ORIG_WHOLE / statistics.median(walls):.1f}x")
    print(f"  client peak RSS (latency runs, 32-byte input): median "
          f"{statistics.median(lat['rss']) / 2**20:.0f} MiB")


def report_large(big: dict[str, Any], lat: dict[str, Any] | None) -> bool:
    size = big["size"]
    print(f"\nlarge files: {size_text(size)} in + {size_text(size)} out, whole run "
          f"{big.get('wall', float('nan')):.2f} s "
          f"({2 * size / 1e6 / big['wall']:.1f} MB/s for both directions' bytes)"
          if "wall" in big else "\nlarge files: the run failed")
    if "timeline" in big:
        print(f"  client's view (s since its start): {big['timeline']}")
    moved = {"in: MInt -> server": big.get("sent", size), "in: server -> site": size,
             "out: site -> server": big.get("fetched", size),
             "out: server -> MInt": big.get("fetched", size)}
    print(f"  {'phase':22} {'seconds':>9}  {'payload MB/s':>12}  {'bytes moved (MB/s)':>21}"
          "  CPU s: server poller client")
    for name, seconds in big.get("phases", {}).items():
        cpu = big.get("cpu", {}).get(name, {})
        used = "  ".join(f"{cpu.get(k, float('nan')):5.1f}" for k in ("server", "poller",
                                                                      "client"))
        if seconds is None:
            print(f"  {name:22} -")
        elif name.startswith("run"):
            print(f"  {name:22} {seconds:7.2f} s  {'':12}  {'':21}  {used}")
        else:
            moved_text = f"{mb(moved[name])} ({moved[name] / 1e6 / seconds:.1f})"
            print(f"  {name:22} {seconds:7.2f} s  {size / 1e6 / seconds:12.1f}  "
                  f"{moved_text:>21}  {used}")
    if big.get("fetched", 0) > size + 10**6:
        print(f"  note: {mb(big['fetched'])} came back for a {mb(size)} output: the site "
              "also sent the unchanged input (the client dropped it on placing); "
              f"placed: {', '.join(big.get('fetched_names', []))}")
    h = big.get("healthz")
    if h:
        print(f"  server /healthz during the run: {h['n']} probes, median {h['median']:.3f} s, "
              f"max {h['max']:.2f} s, {h['over_1s']} over 1 s, {h['errors']} failed")
    for kind, seconds in big["disk"].items():
        print(f"  disk reference: {kind:10} {seconds:7.2f} s  {size / 1e6 / seconds:8.1f} MB/s")
    ok = True
    for name in ("server", "poller"):
        b, a = big["before"][name], big.get("after", {}).get(name, -1)
        if b < 0 or a < 0:
            print(f"  {name} VmHWM: unknown (process gone?)  FAIL")
            ok = False
            continue
        growth = a - b
        verdict = "PASS" if growth < MEM_GOAL else "FAIL"
        ok &= growth < MEM_GOAL
        print(f"  {name:6} VmHWM {b / 2**20:6.1f} MiB -> {a / 2**20:6.1f} MiB: growth "
              f"{mb(growth)} (goal < {mb(MEM_GOAL)}: {verdict})")
    if "client_rss" in big:
        tiny = (f", {statistics.median(lat['rss']) / 2**20:.0f} MiB for a 32-byte input"
                if lat and lat["rss"] else "")
        print(f"  client (remote-exec run) peak RSS {big['client_rss'] / 2**20:.0f} MiB{tiny}")
    print(f"  original: every file base64-encoded into one JSON document in memory "
          f"(~{mb(size * 4 / 3)} for this input) on MInt's client, server and site poller")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=20, help="latency runs (default 20)")
    parser.add_argument("--size", default="1G", help="the large input's and output's size "
                        "(default 1G)")
    parser.add_argument("--quick", action="store_true", help="--size 64M")
    parser.add_argument("--only", choices=("latency", "large"), help="one part only")
    parser.add_argument("--nosendfile", action="store_true",
                        help="start the queue server with AIOHTTP_NOSENDFILE=1 (an "
                             "experiment: aiohttp's own chunked file sending instead of "
                             "asyncio's 16 KiB sendfile fallback over TLS)")
    parser.add_argument("--remote-exec", metavar="CMD",
                        help="the remote-exec command to time, split like a shell would "
                             "(default: the console script beside this Python)")
    args = parser.parse_args()
    size = parse_size("64M" if args.quick else args.size, "--size")
    if size < 1 or args.runs < 1:
        parser.error("--size and --runs must be at least 1")

    # SIGTERM/SIGHUP: unwind like Ctrl-C so that the finally below stops server and poller
    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)

    lat: dict[str, Any] | None = None
    big: dict[str, Any] | None = None
    if args.nosendfile:
        os.environ["AIOHTTP_NOSENDFILE"] = "1"
    with tempfile.TemporaryDirectory(prefix="remote-exec-bench-pull-") as name:
        bench = Bench(Path(name), args.remote_exec)
        try:
            bench.up()
            print(first_line(["uname", "-sr"]) + "; " + first_line(["cp", "--version"])
                  + ("; AIOHTTP_NOSENDFILE=" + os.environ["AIOHTTP_NOSENDFILE"]
                     if "AIOHTTP_NOSENDFILE" in os.environ else ""))
            if args.only != "large":
                lat = bench.latency(args.runs)
            if args.only != "latency":
                try:
                    big = bench.large(size)
                except Failed as exc:
                    bench.failures.append(f"large run: {exc}")
        finally:
            bench.down()
    ok = True
    if lat is not None:
        report_latency(lat)
    if big is not None:
        ok = report_large(big, lat)
    print(f"nproc {nproc()}")
    for failure in bench.failures:
        print(f"FAILED: {failure}")
    return 0 if ok and not bench.failures else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stopped:
        print(f"interrupted ({stopped or 'Ctrl-C'}): queue server and poller stopped",
              file=sys.stderr)
        sys.exit(130)
