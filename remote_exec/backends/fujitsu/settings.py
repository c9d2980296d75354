"""A ``fujitsu`` site's settings: the WebAPI, its paths and auth, the bucket."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from remote_exec.errors import ConfigError
from remote_exec.sizes import SIZE_SCHEMA, parse_size

MIN_MULTIPART = 5 * 1024 * 1024  # S3's smallest part

#: the WebAPI's operations and their default paths (relative to ``api_url``); the
#: guide links them to an API reference, so each can be overridden per site
DEFAULT_PATHS = {
    "sync": "/sync",                          # POST   Start to sync files
    "sync_status": "/sync/{requestid}",       # GET    Get Synchronization Status
    "jobs": "/jobs",                          # POST   Submit a Job / GET Get Job List
    "job": "/jobs/{job_id}",                  # GET    Get Job Detail / DELETE Cancel a Job
}
#: the signed-header scheme's defaults (see :mod:`.auth`)
DEFAULT_HMAC = {
    "access_key_header": "X-Access-Key",
    "timestamp_header": "X-Timestamp",
    "signature_header": "X-Signature",
    "string_to_sign": "{method}\\n{path}\\n{timestamp}\\n{body_sha256}",
}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["api_url", "bucket"],
    "properties": {
        "api_url": {"type": "string", "pattern": "^https?://"},
        "paths": {"type": "object", "additionalProperties": False,
                  "properties": {k: {"type": "string", "minLength": 1} for k in DEFAULT_PATHS}},
        "auth": {"enum": ["bearer", "hmac"]},
        "hmac": {"type": "object", "additionalProperties": False,
                 "properties": {k: {"type": "string", "minLength": 1} for k in DEFAULT_HMAC}},
        "credentials_file": {"type": "string", "minLength": 1},
        "s3_endpoint": {"type": "string", "pattern": "^https?://"},
        "bucket": {"type": "string", "minLength": 3},
        "region": {"type": "string", "minLength": 1},
        "s3_profile": {"type": "string", "minLength": 1},
        "hpc_dir": {"type": "string", "minLength": 1},
        "poll_max": {"type": "number", "minimum": 0.1},
        "request_timeout": {"type": "number", "minimum": 1},
        "multipart_threshold": SIZE_SCHEMA,  # at least MIN_MULTIPART
    },
}
_HPC_DIR = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


@dataclass
class FujitsuSettings:
    api_url: str
    bucket: str
    paths: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PATHS))
    auth: str = "hmac"
    hmac: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_HMAC))
    credentials_file: str | None = None
    s3_endpoint: str | None = None
    region: str | None = None
    s3_profile: str | None = None
    hpc_dir: str = "remote-exec"      # the directory on the HPC side (relative)
    poll_max: float = 30.0            # seconds between two polls at most
    request_timeout: float = 60.0
    multipart_threshold: int = 64 * 1024 * 1024

    @classmethod
    def from_site(cls, values: dict[str, Any] | None, where: str) -> FujitsuSettings:
        if not values:
            raise ConfigError(f"{where}: a `fujitsu` site needs a `fujitsu:` section",
                              hint="at least api_url and bucket (see the README)")
        data = dict(values)
        data["paths"] = {**DEFAULT_PATHS, **(data.get("paths") or {})}
        data["hmac"] = {**DEFAULT_HMAC, **(data.get("hmac") or {})}
        if "multipart_threshold" in data:
            data["multipart_threshold"] = parse_size(data["multipart_threshold"],
                                                     f"{where}: fujitsu.multipart_threshold")
            if data["multipart_threshold"] < MIN_MULTIPART:
                raise ConfigError(f"{where}: fujitsu.multipart_threshold must be at least 5M "
                                  "(S3's smallest part)")
        settings = cls(**data)
        settings.api_url = settings.api_url.rstrip("/")
        if ".." in settings.hpc_dir.split("/") or not _HPC_DIR.match(settings.hpc_dir):
            raise ConfigError(f"{where}: invalid hpc_dir {settings.hpc_dir!r}",
                              hint="a relative path of letters, digits, '.', '_', '-'")
        for name, path in settings.paths.items():
            if not path.startswith("/"):
                raise ConfigError(f"{where}: paths.{name} must start with '/'")
            try:
                path.format(requestid="1", job_id="1")
            except (KeyError, IndexError, ValueError):
                raise ConfigError(f"{where}: paths.{name} {path!r} may only use "
                                  "{requestid} and {job_id}") from None
        return settings


def check_section(values: dict[str, Any] | None, where: str) -> None:
    """The configuration's check of a site's ``fujitsu:`` section (the registry's
    ``section_check``): a ConfigError naming ``where`` if it is missing or wrong."""
    FujitsuSettings.from_site(values, where)
