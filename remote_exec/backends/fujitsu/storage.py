"""The run's files in the object storage (seeds/000 §4.4, §6.7), with boto3.

Keys are ``<run id>/<path in the run directory>``: "Start to sync files" copies the
bucket into the site's ``hpc_dir``, so a run's files land in ``<hpc_dir>/<run id>/`` on the
HPC side, and come back under the same keys. Uploads of large files are multipart
(``multipart_threshold``); progress goes to the run's reporter.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from remote_exec import redact
from remote_exec.backends.fujitsu.settings import FujitsuSettings
from remote_exec.errors import ConfigError, FetchError, StageError
from remote_exec.inputs import CONTROL_DIR, Input
from remote_exec.localfs import input_files

log = logging.getLogger("remote_exec.fujitsu")
Progress = Callable[[str, int, int], None]


class Bucket:
    """One run's prefix in the site's bucket."""

    def __init__(self, settings: FujitsuSettings, run_id: str) -> None:
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
        except ImportError:
            frozen = getattr(sys, "frozen", False)  # the single-file build
            raise ConfigError("the fujitsu backend needs boto3 for the object storage",
                              hint="this single file was built without it: build it with "
                              "`python3 scripts/build_single_file.py --with-fujitsu`" if frozen
                              else "pip install 'remote-exec[fujitsu]' (or boto3)") from None

        session = boto3.session.Session(profile_name=settings.s3_profile) \
            if settings.s3_profile else boto3.session.Session()
        credentials = session.get_credentials()
        if credentials is not None:  # boto3's debug log shows the access key id: mask it
            frozen = credentials.get_frozen_credentials()
            redact.register(frozen.access_key, frozen.secret_key, frozen.token)
        self.client = session.client("s3", endpoint_url=settings.s3_endpoint,
                                     region_name=settings.region)
        self.bucket = settings.bucket
        self.prefix = f"{run_id}/"
        self.config = TransferConfig(multipart_threshold=settings.multipart_threshold,
                                     multipart_chunksize=max(settings.multipart_threshold // 4,
                                                             8 * 1024 * 1024))

    def key(self, rel: str) -> str:
        return self.prefix + rel

    # -- up ----------------------------------------------------------------------------------
    def upload_inputs(self, inputs: list[Input], progress: Progress | None) -> None:
        """Every input (a directory: every file under it, symlinks followed)."""
        for item in inputs:
            for path, rel in input_files([item]):
                tick = _counter(rel, path.stat().st_size, progress)
                try:
                    self.client.upload_file(str(path), self.bucket, self.key(rel),
                                            Config=self.config, Callback=tick)
                except Exception as exc:  # noqa: BLE001 - boto3 raises many kinds
                    raise StageError(f"could not upload {rel} to the bucket {self.bucket}: "
                                     f"{_reason(exc)}",
                                     hint="check the bucket, s3_endpoint, region and the "
                                     "object storage credentials (AWS_* or s3_profile)") from None

    def put(self, rel: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data)
        except Exception as exc:  # noqa: BLE001
            raise StageError(f"could not upload {rel} to the bucket {self.bucket}: "
                             f"{_reason(exc)}",
                             hint="check the bucket, s3_endpoint, region and the object "
                             "storage credentials (AWS_* or s3_profile)") from None

    # -- down --------------------------------------------------------------------------------
    def read(self, rel: str) -> bytes | None:
        """One object's bytes, or None if it does not exist."""
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key(rel))
        except self.client.exceptions.NoSuchKey:
            return None
        except Exception as exc:  # noqa: BLE001
            raise FetchError(f"could not read {rel} from the bucket: {_reason(exc)}") from None
        return bytes(answer["Body"].read())

    def objects(self) -> Iterator[tuple[str, int]]:
        """(path in the run directory, size) of every object of the run."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"][len(self.prefix):], int(item.get("Size", 0))

    def download(self, dest: Path, keep: Callable[[str], bool] | None,
                 progress: Progress | None) -> list[str]:
        """Download the run's objects (but ``.remote-exec/``) into ``dest``; the skipped."""
        skipped: list[str] = []
        try:
            for rel, size in list(self.objects()):
                if rel.startswith(CONTROL_DIR + "/") or not rel or rel.endswith("/"):
                    continue
                if not _safe(rel):
                    skipped.append(f"{rel} (a path outside the run directory)")
                    continue
                if keep is not None and not keep(rel):
                    continue
                target = dest / rel
                if target.is_file() and target.stat().st_size == size:
                    continue  # an earlier attempt brought it
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".part")
                self.client.download_file(self.bucket, self.key(rel), str(partial),
                                          Config=self.config,
                                          Callback=_counter(rel, size, progress))
                os.replace(partial, target)
        except FetchError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise FetchError(f"could not download the results from the bucket "
                             f"{self.bucket}: {_reason(exc)}") from None
        return skipped

    def remove(self) -> int:
        """Delete the run's objects; how many."""
        keys = [{"Key": self.key(rel)} for rel, _ in self.objects()]
        for start in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket,
                                       Delete={"Objects": keys[start:start + 1000]})
        return len(keys)


def _counter(rel: str, size: int, progress: Progress | None) -> Callable[[int], None] | None:
    """boto3's per-chunk callback as ``progress(name, done so far, total)``."""
    if progress is None:
        return None
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        progress(rel, done, size)
    return tick


def _safe(rel: str) -> bool:
    parts = rel.split("/")
    return not rel.startswith("/") and ".." not in parts and "" not in parts


def _reason(exc: Any) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        return f"{error.get('Code', '')} {error.get('Message', '')}".strip() or str(exc)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
