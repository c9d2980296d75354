"""A ``rescale`` site's ``rescale:`` section: the platform, the key, the job's hardware
and where it runs (a persistent cluster, or on demand).

::

    rescale:
      platform: https://platform.rescale.jp
      token_file: ~/.config/remote-exec/rescale.token   # 0600; or REMOTE_EXEC_RESCALE_TOKEN
      analysis: {code: user_included, version: "0"}
      hardware: {coreType: hpc-3, coresPerSlot: 1, slots: 1, walltime: 10}
      core_type_as: code        # {"coreType": {"code": ...}} (seed 004, v3) | string (v2)
      low_priority: true
      cluster: {id: kvHyW, start: true, start_timeout: 900}   # absent: on-demand jobs
      api: {jobs: v2, files: v2, clusters: v3}
      poll_max: 30

What the sources leave open (the walltime's unit, the core type's shape, the API
versions, the cluster-submit path) is a setting with the seed's value as default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from remote_exec.errors import ConfigError

SECTION = "rescale"
#: the version segment of each group of calls (seed 004 uses v3 for clusters and jobs; the
#: reference documents v2 as the supported one)
DEFAULT_API = {"jobs": "v2", "files": "v2", "clusters": "v3", "coretypes": "v2"}
#: seed 004's persistent-cluster submit call: note the path without a version
DEFAULT_CLUSTER_SUBMIT = "/api/clusters/{cluster_id}/jobs/"
DEFAULT_ANALYSIS = {"code": "user_included", "version": "0"}
#: files the service itself writes next to the job's (not the run's results)
DEFAULT_SERVICE_FILES = ["process_output.log"]

_HARDWARE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["coreType"],
    "properties": {
        "coreType": {"type": "string", "minLength": 1},
        "coresPerSlot": {"type": "integer", "minimum": 1},
        "slots": {"type": "integer", "minimum": 1},
        "walltime": {"type": "integer", "minimum": 1},  # the seed: 10; the unit is unsure
    },
}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["platform", "hardware"],
    "properties": {
        "platform": {"type": "string", "pattern": "^https?://"},
        "token_file": {"type": "string", "minLength": 1},
        "analysis": {"type": "object", "additionalProperties": False,
                     "required": ["code", "version"],
                     "properties": {"code": {"type": "string", "minLength": 1},
                                    "version": {"type": "string"}}},
        "hardware": _HARDWARE,
        "core_type_as": {"enum": ["code", "string"]},
        "low_priority": {"type": "boolean"},
        "cluster": {"type": "object", "additionalProperties": False, "required": ["id"],
                    "properties": {"id": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"},
                                   "start": {"type": "boolean"},
                                   "start_timeout": {"type": "number", "minimum": 1}}},
        "api": {"type": "object", "additionalProperties": False,
                "properties": {k: {"type": "string", "pattern": "^v[0-9]+$"}
                               for k in DEFAULT_API}},
        "cluster_submit_path": {"type": "string", "pattern": "^/.*\\{cluster_id\\}.*/$"},
        "service_files": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "poll_max": {"type": "number", "minimum": 0.05},
        "request_timeout": {"type": "number", "minimum": 1},
        "page_size": {"type": "integer", "minimum": 1, "maximum": 1000},
    },
}


@dataclass
class Cluster:
    """A persistent cluster the jobs are submitted to."""

    id: str
    start: bool = False          # start it (and wait for it) when it is not running
    start_timeout: float = 1800.0


@dataclass
class RescaleSettings:
    platform: str
    hardware: dict[str, Any]
    token_file: str | None = None
    analysis: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ANALYSIS))
    core_type_as: str = "code"
    low_priority: bool = False
    cluster: Cluster | None = None
    api: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_API))
    cluster_submit_path: str = DEFAULT_CLUSTER_SUBMIT
    service_files: list[str] = field(default_factory=lambda: list(DEFAULT_SERVICE_FILES))
    poll_max: float = 30.0        # seconds between two polls at most
    request_timeout: float = 60.0
    page_size: int = 100

    @classmethod
    def from_site(cls, values: dict[str, Any] | None, where: str) -> RescaleSettings:
        if not values:
            raise ConfigError(f"{where}: a `rescale` site needs a `rescale:` section",
                              hint="at least platform and hardware.coreType (see the README)")
        data = dict(values)
        data["api"] = {**DEFAULT_API, **(data.get("api") or {})}
        if data.get("cluster") is not None:
            data["cluster"] = Cluster(**data["cluster"])
        settings = cls(**data)
        settings.platform = settings.platform.rstrip("/")
        return settings

    def hardware_body(self) -> dict[str, Any]:
        """The job's ``hardware`` object, the core type in the site's chosen shape."""
        body = {"coresPerSlot": 1, **self.hardware}
        if self.core_type_as == "code":
            body["coreType"] = {"code": self.hardware["coreType"]}
        return body


def check_section(values: dict[str, Any] | None, where: str) -> None:
    """The configuration's check of a site's ``rescale:`` section (the registry's
    ``section_check``): a ConfigError naming ``where`` if it is missing or wrong."""
    RescaleSettings.from_site(values, where)
