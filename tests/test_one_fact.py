"""Each fact once: what the client and the remote-side agent must agree on is written once.

* Typed template parameters: the client (``templates.py``) and a restricted site's
  agent give the same verdict on the same values, because the rules live in the agent.
* The launch-once guard, the cancel mark and the protocol's exit codes: the control
  scripts (``launch.sh``, ``cancel.sh``, the batch ``batch.sh``) are built from one set
  of shell fragments whose constants come from the agent, and they behave as the agent
  does (a run cancelled before launch records 143 and can never start).
* The resource keys of a batch job: the configuration schema is built from
  ``Resources.KEYS``.
* Names the code no longer has (issue 12) stay gone.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from remote_exec import entrypoint, templates
from remote_exec.agent_file import agent_module
from remote_exec.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
AGENT_FILE = REPO / "remote-side_scripts" / "remote_exec_agent.py"


def _fresh_agent() -> Any:
    """The agent file imported on its own, as a site runs it (not the client's copy)."""
    spec = importlib.util.spec_from_file_location("remote_exec_agent_alone", AGENT_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AGENT = _fresh_agent()

# -- typed parameters: same values, same verdicts ----------------------------------------

TEMPLATE_YAML = """\
description: every parameter type, for the agreement test
parameters:
  s: {type: string, pattern: '[a-z0-9_.-]+'}
  i: {type: int, min: 1, max: 64}
  f: {type: float, min: 0.5}
  b: {type: bool}
  c: {type: choice, choices: [fast, exact]}
  p: {type: path}
  fi: {type: file}
  li: {type: list, items: int, max: 9}
  lf: {type: list, items: file}
  ls: {type: list}
  req: {type: string, required: true}
"""

#: (parameter, value or list of values, accepted?)
VALUES: list[tuple[str, Any, bool]] = [
    ("s", "abc_1.x", True), ("s", "a b", False), ("s", "$(id)", False), ("s", "", False),
    ("i", "1", True), ("i", "64", True), ("i", "0", False), ("i", "65", False),
    ("i", "four", False), ("i", "1.5", False), ("i", " 7", True),
    ("f", "0.5", True), ("f", "1e3", True), ("f", "0.4", False), ("f", "nan", False),
    ("f", "inf", False), ("f", "x", False),
    ("b", "true", True), ("b", "ON", True), ("b", "0", True), ("b", "no", True),
    ("b", "maybe", False), ("b", "", False),
    ("c", "fast", True), ("c", "exact", True), ("c", "Fast", False), ("c", "", False),
    ("p", "/opt/tool", True), ("p", "~/bin/x", True), ("p", "~", True),
    ("p", "/opt/../bin/sh", False), ("p", "..", False),
    ("fi", "model.inp", True), ("fi", "sub/dir/m.inp", True), ("fi", "..x", True),
    ("fi", "/etc/passwd", False), ("fi", "../x", False), ("fi", "-rf", False),
    ("fi", "", False), ("fi", "a\nb", False), ("fi", "a\x00b", False),
    ("li", ["1", "9"], True), ("li", ["1", "10"], False), ("li", ["1", ""], False),
    ("li", ["x"], False),
    ("lf", ["a.txt", "b c.txt"], True), ("lf", ["a.txt", "../b"], False),
    ("ls", ["anything; at all", "$(id)"], True), ("ls", ["a", ""], False),
    ("ls", ["cr\rx"], False),
    ("s", "line\nbreak", False), ("c", "fast\r", False),
]


@pytest.fixture()
def template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> templates.Template:
    directory = tmp_path / "templates" / "every_type"
    directory.mkdir(parents=True)
    (directory / "template.yaml").write_text(TEMPLATE_YAML)
    (directory / "entrypoint.sh.j2").write_text("#!/bin/sh\necho \"$RE_s\"\n")
    monkeypatch.setenv("REMOTE_EXEC_TEMPLATES", str(tmp_path / "templates"))
    return templates.load_template("every_type")


def _client(tpl: templates.Template, name: str, value: Any) -> tuple[bool, Any]:
    raws = value if isinstance(value, list) else [value]
    try:
        values = tpl.bind(["req=x", *(f"{name}={raw}" for raw in raws)])
    except ConfigError as exc:
        return False, str(exc)
    return True, values[name]


def _agent(tpl: templates.Template, name: str, value: Any) -> tuple[bool, Any]:
    """The agent's verdict, from the declarations ``site install`` puts in the allowlist."""
    declared = tpl.declarations()
    entry = AGENT.Entrypoint("every_type", {
        "path": "/nonexistent", "sha256": "0" * 64, "parameters": declared,
    }, "allowlist", "/")
    try:
        values = entry.bind({"req": "x", name: value})
    except AGENT.Refused as exc:
        return False, str(exc)
    return True, values[name]


@pytest.mark.parametrize("name, value, accepted", VALUES,
                         ids=[f"{n}={v!r}" for n, v, _ in VALUES])
def test_client_and_agent_give_the_same_verdict(template: templates.Template, name: str,
                                                value: Any, accepted: bool) -> None:
    client_ok, client_value = _client(template, name, value)
    agent_ok, agent_value = _agent(template, name, value)
    assert (client_ok, agent_ok) == (accepted, accepted), (client_value, agent_value)
    if accepted:
        assert client_value == agent_value
    else:  # the same reason, in the same words, on both sides
        assert f"parameter {name!r}" in client_value
        assert client_value == agent_value


def test_defaults_and_missing_parameters_agree(template: templates.Template) -> None:
    client = template.bind(["req=x"])
    entry = AGENT.Entrypoint("every_type", {
        "path": "/nonexistent", "sha256": "0" * 64, "parameters": template.declarations(),
    }, "allowlist", "/")
    assert entry.bind({"req": "x"}) == client
    with pytest.raises(ConfigError, match=r"needs --param req=\.\.\."):
        template.bind([])
    with pytest.raises(AGENT.MissingParameter, match="needs parameter 'req'"):
        entry.bind({})
    with pytest.raises(ConfigError, match="has no parameter 'nosuch'"):
        template.bind(["req=x", "nosuch=1"])
    with pytest.raises(AGENT.Refused, match="has no parameter 'nosuch'"):
        entry.bind({"req": "x", "nosuch": "1"})


#: declarations both sides must refuse: (the parameter's YAML, a word of the message)
BAD_DECLARATIONS = [
    ("{type: str}", "type must be one of"),
    ("{type: string, items: file}", "only for type list"),
    ("{type: list, items: list}", "items must be one of"),
    ("{type: choice}", "choices"),
    ("{type: choice, choices: abc}", "choices"),
    ("{type: string, choices: [a]}", "only for type choice"),
    ("{type: string, min: 1}", "only for int and float"),
    ("{type: int, max: ten}", "must be a number"),
    ("{type: string, pattern: '('}", "not valid"),
    ("{type: string, pattern: 12}", "'pattern' must be a string"),
    ("{type: string, required: maybe}", "'required' must be true or false"),
    ("{type: int, default: 0, min: 1}", "minimum"),
    ("{type: file, default: /etc/passwd}", "absolute"),
    ("{type: list, default: a}", "must be a list"),
    ("{type: string, defualt: a}", "unknown keys"),
    ("[string]", "mapping"),
]


@pytest.mark.parametrize("yaml_spec, needle", BAD_DECLARATIONS,
                         ids=[n for _, n in BAD_DECLARATIONS])
def test_bad_declarations_are_refused_by_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              yaml_spec: str, needle: str) -> None:
    import yaml

    directory = tmp_path / "templates" / "bad"
    directory.mkdir(parents=True)
    (directory / "template.yaml").write_text(f"parameters:\n  x: {yaml_spec}\n")
    (directory / "entrypoint.sh.j2").write_text("#!/bin/sh\n")
    monkeypatch.setenv("REMOTE_EXEC_TEMPLATES", str(tmp_path / "templates"))
    with pytest.raises(ConfigError, match=re.escape(needle)) as client:
        templates.load_template("bad")
    with pytest.raises(ValueError, match=re.escape(needle)) as agent:
        AGENT.Parameter("x", yaml.safe_load(yaml_spec), "allowlist")
    # the same words after the file name
    assert str(client.value).split(": parameter 'x': ", 1)[1] == \
        str(agent.value).split(": parameter 'x': ", 1)[1]


@pytest.mark.parametrize("name", ["generic", "abaqus", "code_aster", "python"])
def test_shipped_declarations_load_in_the_agent(name: str) -> None:
    """What ``site install`` writes into an allowlist is accepted by the agent as is."""
    tpl = templates.load_template(name)
    for pname, spec in tpl.declarations().items():
        rules = AGENT.Parameter(pname, spec, "allowlist")
        assert rules.default == tpl.parameters[pname].default


def test_the_client_has_no_rules_of_its_own() -> None:
    """templates.py keeps no copy of the agent's tables or checks."""
    source = (REPO / "remote_exec" / "templates.py").read_text()
    for copy in ('"yes", "on"', '"string", "int", "float"', "float(\"inf\")",
                 "is absolute; give a path", "does not match the pattern",
                 "[A-Za-z_][A-Za-z0-9_]*"):
        assert copy not in source, copy


# -- the launch-once guard, the cancel mark, the protocol constants ----------------------

def test_protocol_constants_come_from_the_agent() -> None:
    from remote_exec.backends import agent_protocol as agent_backend
    from remote_exec.inputs import LOG_NAME

    agent = agent_module()
    assert entrypoint.ALREADY_LAUNCHED == agent.EXIT_ALREADY_LAUNCHED == 96
    assert agent_backend.REFUSED == agent.EXIT_REFUSED
    assert agent_backend.MARK_WORD == agent.MARK_WORD
    assert agent_backend.PREFIX == agent.SAY_PREFIX
    assert (entrypoint.TERMINATED, entrypoint.KILLED) == (143, 137)
    assert LOG_NAME == agent.LOG_NAME
    assert templates.return_all() == agent.RETURN_ALL == ["**"]


#: text that belongs to one definition only: the files allowed to hold it (none: the text
#: is built from the constants, never written out)
ONE_PLACE: dict[str, list[str]] = {
    r"mkdir [^\n]*launched": [],
    r"exit_code\.tmp": [],
    r": > [^\n]*cancelled": [],
    r"\b96\b": ["remote-side_scripts/remote_exec_agent.py"],
    r"MARK_WORD = ": ["remote-side_scripts/remote_exec_agent.py"],
    r"\"remote-exec agent: \"": ["remote-side_scripts/remote_exec_agent.py"],
    r"\"remote_program_exec\.log\"": ["remote-side_scripts/remote_exec_agent.py"],
    r"\"nodes\", \"tasks\"": ["remote_exec/backends/scheduler.py"],
    r"_TRUE = ": ["remote-side_scripts/remote_exec_agent.py"],
}


@pytest.mark.parametrize("pattern", sorted(ONE_PLACE))
def test_a_fact_is_written_in_one_place(pattern: str) -> None:
    files = [*sorted((REPO / "remote_exec").rglob("*.py")), AGENT_FILE]
    holders = sorted({str(f.relative_to(REPO)) for f in files
                      if re.search(pattern, f.read_text(encoding="utf-8"))})
    assert holders == ONE_PLACE[pattern]


def test_every_control_script_has_the_shared_guard() -> None:
    from remote_exec.backends.batch import SUBMITTER

    for script in (entrypoint.LAUNCHER, entrypoint.CANCELLER, SUBMITTER):
        assert "mkdir .remote-exec/launched 2>/dev/null" in script
        assert script.splitlines()[0] == "#!/bin/sh"
        assert entrypoint.ENTER_RUN_DIR in script
    for script in (entrypoint.CANCELLER, SUBMITTER):
        assert entrypoint.cancel_unlaunched("x").splitlines()[0].strip() in script


def _scripts(rundir: Path) -> None:
    files = entrypoint.Entrypoint("command", "t", "echo ran").control_files()
    control = rundir / ".remote-exec"
    control.mkdir(parents=True)
    for name, data in files.items():
        (control / name).write_bytes(data)
    (control / "command").write_text("echo ran\n")


def _sh(rundir: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh", str(rundir / ".remote-exec" / script), *args],
                          capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "SHELL": "/bin/sh"})


def test_control_scripts_launch_once(tmp_path: Path) -> None:
    _scripts(tmp_path)
    first = _sh(tmp_path, "launch.sh")
    assert first.returncode == 0 and first.stdout.startswith("started "), first.stderr
    assert (tmp_path / ".remote-exec" / "exit_code").read_text() == "0\n"
    assert (tmp_path / "remote_program_exec.log").read_text() == "ran\n"
    again = _sh(tmp_path, "launch.sh")
    assert again.returncode == entrypoint.ALREADY_LAUNCHED
    assert "already launched" in again.stderr
    assert not list((tmp_path / ".remote-exec").glob("*.tmp"))


def test_a_cancel_before_launch_records_143_and_blocks_the_launch(tmp_path: Path) -> None:
    _scripts(tmp_path)
    cancel = _sh(tmp_path, "cancel.sh", "1")
    assert (cancel.returncode, cancel.stdout) == (0, "not started\n"), cancel.stderr
    control = tmp_path / ".remote-exec"
    assert (control / "exit_code").read_text() == f"{entrypoint.TERMINATED}\n"
    assert (control / "cancelled").exists()
    late = _sh(tmp_path, "launch.sh")
    assert late.returncode == entrypoint.ALREADY_LAUNCHED
    assert not (tmp_path / "remote_program_exec.log").exists()


def test_the_batch_submitter_shares_the_guard(tmp_path: Path) -> None:
    from remote_exec.backends.batch import SUBMITTER

    control = tmp_path / ".remote-exec"
    control.mkdir()
    (control / "batch.sh").write_text(SUBMITTER)
    cancel = _sh(tmp_path, "batch.sh", "cancel")
    assert (cancel.returncode, cancel.stdout) == (0, "not submitted\n")
    assert (control / "exit_code").read_text() == f"{entrypoint.TERMINATED}\n"
    late = _sh(tmp_path, "batch.sh", "submit", "/bin/echo", "123")
    assert late.returncode == entrypoint.ALREADY_LAUNCHED and "already submitted" in late.stderr
    again = _sh(tmp_path, "batch.sh", "cancel")
    assert (again.returncode, again.stdout) == (0, "submitted\n")


def test_the_run_directory_must_exist_for_a_control_script(tmp_path: Path) -> None:
    script = tmp_path / "gone" / ".remote-exec" / "x.sh"
    proc = subprocess.run(["/bin/sh", "-c", entrypoint.ENTER_RUN_DIR, str(script)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == entrypoint.NO_RUN_DIR


# -- resources ------------------------------------------------------------------------------

def test_the_resources_schema_is_built_from_the_resource_keys() -> None:
    from remote_exec.backends.scheduler import Resources
    from remote_exec.config import schema

    site = schema()["properties"]["sites"]["additionalProperties"]["properties"]
    assert list(site["resources"]["properties"]) == list(Resources.KEYS)
    assert site["resources"]["additionalProperties"] is False


def test_config_loading_does_not_import_ssh_code() -> None:
    code = ("import sys, remote_exec.config; "
            "print(sorted(m for m in ('asyncssh', 'jinja2', 'remote_exec_agent') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert proc.stdout.strip() == "[]"


# -- gone -------------------------------------------------------------------------------------

def test_dead_names_stay_gone() -> None:
    from remote_exec import errors, journal, manage
    from remote_exec.ssh import link

    assert not hasattr(errors, "StaleConnectionError")
    assert not hasattr(journal.Journal, "forget")
    assert not hasattr(manage, "describe_age")
    assert not hasattr(link.Link, "reconnects")
    assert not hasattr(templates, "check_run_file")
    sources = [p.read_text(encoding="utf-8") for p in (REPO / "remote_exec").rglob("*.py")]
    assert not any("CHOOSABLE" in text for text in sources)
