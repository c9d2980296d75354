"""The JSON bodies of the pull protocol, as fastjsonschema validators.

Unknown fields are refused everywhere (``additionalProperties: false``): a client built
for another version of the protocol learns it at once instead of being half-understood.
"""

from __future__ import annotations

from typing import Any, Callable

import fastjsonschema

from remote_exec.queue.errors import bad_request

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
PROGRESS_STATES = ["staging", "staged", "launching", "running", "uploading"]
OUTCOMES = ["exited", "signaled", "cancelled", "rejected", "failed_to_start", "lost"]

_text = {"type": "string", "maxLength": 65536}
_file = {
    "type": "object", "additionalProperties": False,
    "required": ["path", "size", "sha256"],
    "properties": {"path": {"type": "string"}, "size": {"type": "integer", "minimum": 0},
                   "sha256": {"type": "string", "pattern": SHA256_PATTERN}},
}
_input = {**_file, "properties": {**_file["properties"],
                                  "mode": {"type": "integer", "minimum": 0, "maximum": 0o7777}}}

CREATE_RUN = {
    "type": "object", "additionalProperties": False,
    "required": ["id", "site", "entrypoint"],
    "properties": {
        "id": {"type": "string", "pattern": RUN_ID_PATTERN},
        "site": {"type": "string", "minLength": 1, "maxLength": 256},
        "entrypoint": {"type": "string", "minLength": 1, "maxLength": 256},
        "params": {"type": "object", "additionalProperties": {
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}},
        "inputs": {"type": "array", "items": _input, "maxItems": 100000},
        "returns": {"type": "array", "items": {"type": "string"}},
        "queue_timeout": {"type": "number", "exclusiveMinimum": 0},
    },
}
EMPTY = {"type": "object", "additionalProperties": False, "properties": {}}
CLAIM = {
    "type": "object", "additionalProperties": False, "required": ["poller"],
    "properties": {
        "poller": {"type": "object", "additionalProperties": False, "required": ["id"],
                   "properties": {"id": {"type": "string", "minLength": 1, "maxLength": 256},
                                  "host": {"type": "string", "maxLength": 256},
                                  "version": {"type": "string", "maxLength": 64}}},
        "wait": {"type": "number", "minimum": 0},
        "entrypoints": {"type": "array", "items": {"type": "string"}},
    },
}
EVENT = {
    "type": "object", "additionalProperties": False, "required": ["lease"],
    "properties": {"lease": {"type": "string"}, "state": {"enum": PROGRESS_STATES},
                   "pid": {"type": ["integer", "null"]}, "message": _text},
}
FINISH = {
    "type": "object", "additionalProperties": False, "required": ["lease", "outcome"],
    "properties": {
        "lease": {"type": "string"}, "outcome": {"enum": OUTCOMES},
        "exit_code": {"type": ["integer", "null"]}, "signal": {"type": ["integer", "null"]},
        "reason": {"type": ["string", "null"], "maxLength": 256},
        "message": {"type": ["string", "null"], "maxLength": 65536},
        "outputs": {"type": "array", "items": _file},
        "held_back": {"type": "array", "items": {"type": "string"}},
    },
}


def _compile(schema: dict[str, Any]) -> Callable[[Any], Any]:
    check = fastjsonschema.compile(schema)

    def validate(body: Any) -> Any:
        try:
            return check(body)
        except fastjsonschema.JsonSchemaException as err:
            message = err.message
            if message.startswith("data"):
                message = "body" + message[4:]
            raise bad_request(f"{message} (see docs/pull-protocol.md)") from None

    return validate


validate_create = _compile(CREATE_RUN)
validate_empty = _compile(EMPTY)
validate_claim = _compile(CLAIM)
validate_event = _compile(EVENT)
validate_finish = _compile(FINISH)
