"""A run as asked (:class:`RunRequest`) and as it ended (:class:`RunResult`), and the
request as JSON: what the holder's wire carries and the journal keeps. Imports nothing
above the configuration, so every layer may use it."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from remote_exec.config import Site
from remote_exec.entrypoint import Entrypoint
from remote_exec.inputs import Input


@dataclass
class RunRequest:
    """Everything decided before the first packet."""

    site: Site
    inputs: list[Input]
    entrypoint: Entrypoint
    into: Path
    keep: bool = False
    follow: bool = False
    backend: str = "direct"
    timeout: float | None = None  # seconds for the whole run, from created_at
    returns: list[str] = field(default_factory=lambda: ["**"])  # the template's patterns
    resources: dict[str, Any] = field(default_factory=dict)  # a batch job's (Resources)
    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created_at: float = field(default_factory=time.time)


@dataclass
class RunResult:
    """What happened. ``exit_code`` is the entrypoint's own."""

    run_id: str
    rundir: str
    exit_code: int
    fetched: list[str]
    remote_kept: bool
    stage_method: str = ""
    fetch_method: str = ""
    skipped: list[str] = field(default_factory=list)
    failure: str = ""  # why it failed, when more is known than the exit code

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


# -- the request as JSON (the holder's wire and the journal's record) -----------------------

def request_to_wire(request: RunRequest) -> dict[str, Any]:
    data = asdict(request)
    data["into"] = str(request.into)
    data["inputs"] = [{**asdict(i), "source": os.path.abspath(i.source)} for i in request.inputs]
    return data


def request_from_wire(data: dict[str, Any]) -> RunRequest:
    return RunRequest(
        site=Site(**data["site"]),
        inputs=[Input(source=Path(i["source"]), name=i["name"], is_dir=i["is_dir"],
                      size=i["size"]) for i in data["inputs"]],
        entrypoint=Entrypoint(**data["entrypoint"]),
        into=Path(data["into"]), keep=data["keep"], follow=data["follow"],
        backend=data["backend"], timeout=data.get("timeout"), run_id=data["run_id"],
        returns=data.get("returns") or ["**"], resources=data.get("resources") or {},
        created_at=data.get("created_at") or time.time(),
    )
