"""``remote-exec demo``: one real run through the sandbox, shown to a newcomer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from remote_exec.paths import state_dir

if TYPE_CHECKING:
    from remote_exec.config import Site
    from remote_exec.request import RunRequest

SAMPLE_INPUTS = {
    "yield_strength.dat": "345.0\n",
    "tensile_strength.dat": "520.0\n",
    "reduction_area.dat": "0.62\n",
}


def demo_request(site: Site, inputs_dir: Path, into: Path) -> RunRequest:
    """The demo's run: the site's entrypoint with the sample inputs, built like any
    other run (:func:`remote_exec.request.build_request`)."""
    from remote_exec.request import build_request

    return build_request(site, inputs=[str(inputs_dir / n) for n in SAMPLE_INPUTS], into=into)


def run_demo(into: Path | None, backend: str = "direct") -> int:
    """Start the local stand-in of a site for ``backend`` (the registry's ``sandbox``:
    the loopback sshd, or a queue server and poller), run the sample solver with sample
    inputs, show the results."""
    from rich.console import Console
    from rich.table import Table

    from remote_exec import backends
    from remote_exec.config import Config
    from remote_exec.run import execute, read_log_tail
    from remote_exec.ui import Reporter

    console = Console(stderr=False)
    box = backends.resolve(backends.get(backend).sandbox)()
    site_name = box.site_name
    console.print(f"[bold]1.[/] starting {box.title} on 127.0.0.1 ...")
    definition = box.up()
    console.print(f"   {box.describe(definition)}")
    work = into or state_dir() / "demo" / time.strftime("%Y%m%d-%H%M%S")
    inputs_dir = work / "inputs"
    inputs_dir.mkdir(parents=True, exist_ok=True)
    for name, text in SAMPLE_INPUTS.items():
        (inputs_dir / name).write_text(text)
    console.print(f"[bold]2.[/] sample inputs written to {inputs_dir}")
    site = Config(path=None, sites={site_name: definition}, defaults={},
                  legacy={}).site(site_name)
    request = demo_request(site, inputs_dir, work / "results")
    console.print(f"[bold]3.[/] remote-exec run --site {site_name} " + " ".join(SAMPLE_INPUTS))
    started = time.monotonic()
    result = execute(request, Reporter())
    elapsed = time.monotonic() - started
    table = Table(title=f"returned into {request.into}  ({elapsed:.2f} s, exit {result.exit_code})")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    for path in sorted(request.into.rglob("*")):
        if path.is_file():
            table.add_row(str(path.relative_to(request.into)), str(path.stat().st_size))
    console.print(table)
    summary = request.into / "summary.txt"
    if summary.is_file():
        console.print("[bold]summary.txt[/]\n" + summary.read_text())
    if not result.ok:
        console.print("[red]the sample entrypoint failed:[/]\n" + read_log_tail(request.into))
    console.print("stop the sandbox with `remote-exec sandbox down`")
    return result.exit_code
