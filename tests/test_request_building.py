"""One function builds every run request (issue 12): ``run``, ``legacy`` and ``demo``
all go through :func:`remote_exec.request.build_request`; a site is immutable and a
run's own settings make a copy; the backend, and whether it takes resources, come from
the registry. No sshd: everything here is decided before connecting."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click
import pytest

from remote_exec import backends, demo, legacy
from remote_exec.config import Config, Site, parse_config
from remote_exec.errors import ConfigError, InputError
from remote_exec.request import build_request, request_from_wire, request_to_wire

ENTRY = "~/bin/site_program.sh"


def site(name: str = "lab", **values: Any) -> Site:
    config = Config(path=Path("test.yaml"), sites={name: {"host": "h", **values}},
                    defaults={}, legacy={})
    return config.site(name)


@pytest.fixture
def inputs(tmp_path: Path) -> list[str]:
    for name in ("a.dat", "b.dat"):
        (tmp_path / name).write_text(name)
    return [str(tmp_path / "a.dat"), str(tmp_path / "b.dat")]


def comparable(request: Any) -> dict[str, Any]:
    """A request as JSON, without what differs between two builds of the same run."""
    data = request_to_wire(request)
    del data["run_id"], data["created_at"]
    return data


# -- a site is immutable; a run's own settings go on a copy --------------------------------

def test_overrides_make_a_copy_and_leave_the_configured_site_untouched(inputs, tmp_path):
    configured = site(retry_tries=7, stall_timeout=30, transfer="rsync")
    before = dataclasses.asdict(configured)
    request = build_request(configured, command="true", inputs=inputs, into=tmp_path,
                            transfer="sftp", retry="3,10s", stall_timeout="2m",
                            timeout="1h")
    assert request.site is not configured
    assert (request.site.transfer, request.site.retry_tries, request.site.retry_max_interval,
            request.site.stall_timeout) == ("sftp", 3, 10.0, 120.0)
    assert request.timeout == 3600.0
    assert dataclasses.asdict(configured) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        configured.transfer = "sftp"  # type: ignore[misc]


def test_without_overrides_the_site_is_used_as_configured(inputs):
    configured = site()
    assert build_request(configured, inputs=inputs).site is configured


def test_the_wire_form_rebuilds_the_same_site(inputs):
    request = build_request(site(templates=["generic"], resources={"nodes": 2}, backend="slurm"),
                            command="true", inputs=inputs, retry="2", resources=["walltime=5m"])
    again = request_from_wire(request_to_wire(request))
    assert again.site == request.site and isinstance(again.site, Site)
    assert comparable(again) == comparable(request)


@pytest.mark.parametrize(("options", "message"), [
    ({"retry": "x,10s"}, "invalid --retry"),
    ({"stall_timeout": "soon"}, "invalid duration"),
    ({"timeout": "1 week"}, "invalid duration"),
    ({"transfer": "scp"}, "invalid --transfer"),
])
def test_bad_limits_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        build_request(site(), command="true", **options)


# -- what runs ---------------------------------------------------------------------------------

def test_the_entrypoint_choice():
    lab = site(entrypoint=ENTRY, templates=["generic"])
    assert build_request(lab).entrypoint.kind == "site"
    assert build_request(lab).entrypoint.text == ENTRY
    command = build_request(lab, command="cat a > b").entrypoint
    assert (command.kind, command.text) == ("command", "cat a > b")
    tpl = build_request(lab, template="generic", params=["program=~/bin/x", "args=1"])
    assert tpl.entrypoint.kind == "template" and "~/bin/x" not in tpl.entrypoint.label


@pytest.mark.parametrize(("options", "message"), [
    ({"command": "true", "template": "generic"}, "either --cmd or --template"),
    ({"params": ["program=x"]}, "--param needs --template"),
    ({"command": "  "}, "--cmd is empty"),
    ({"template": "python"}, "template 'python' is not allowed on site 'lab'"),
    ({"template": "generic", "params": ["args=1"]}, "program"),  # required, missing
    ({"template": "generic", "params": ["program=a b"]}, "program"),  # breaks its pattern
    ({"template": "generic", "params": ["program=x", "colour=red"]}, "colour"),  # unknown
])
def test_what_runs_is_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        build_request(site(templates=["generic"]), **options)


def test_inputs_are_checked(tmp_path):
    with pytest.raises(InputError):
        build_request(site(), command="true", inputs=[str(tmp_path / "missing.dat")])


# -- the backend and its resources, from the registry ---------------------------------------

def test_resources_are_refused_for_a_backend_that_takes_none():
    assert not backends.get("direct").takes_resources
    with pytest.raises(ConfigError, match="--resource is for batch jobs") as caught:
        build_request(site(), command="true", resources=["nodes=2"])
    assert "slurm" in (caught.value.hint or "")


def test_a_batch_backend_takes_the_site_resources_and_the_run_overrides():
    cluster = site(backend="slurm", resources={"nodes": 2, "walltime": "1:00:00"})
    request = build_request(cluster, command="true", resources=["walltime=30m", "queue=short"])
    assert request.backend == "slurm"
    assert request.resources["nodes"] == 2 and request.resources["walltime_s"] == 1800
    assert request.resources["queue"] == "short"
    # --backend over the site's, and a direct run takes neither the site's resources
    assert build_request(cluster, command="true", backend="direct").resources == {}
    assert build_request(site(), command="true", backend="pbs").backend == "pbs"


@pytest.mark.parametrize("pair", ["nodes", "=2"])
def test_a_malformed_resource_is_refused(pair):
    with pytest.raises(ConfigError, match="invalid --resource"):
        build_request(site(backend="slurm"), command="true", resources=[pair])


def test_a_bad_resource_value_is_refused_before_connecting():
    with pytest.raises(ConfigError, match="nodes"):
        build_request(site(backend="slurm"), command="true", resources=["nodes=many"])


# -- a restricted site ---------------------------------------------------------------------

def restricted() -> Site:
    return site("locked", restricted=True, entrypoint=ENTRY, templates=["generic"])


def test_a_restricted_site_runs_through_its_agent():
    request = build_request(restricted())
    assert request.backend == backends.RESTRICTED
    assert (request.entrypoint.kind, request.entrypoint.text) == ("approved", "site")
    tpl = build_request(restricted(), template="generic",
                        params=["program=~/x", "args=1", "args=2"]).entrypoint
    assert (tpl.kind, tpl.text) == ("approved", "generic")
    assert tpl.params == {"program": "~/x", "args": ["1", "2"]}


def test_backend_on_a_restricted_site_is_refused():
    with pytest.raises(ConfigError, match="restricted"):
        build_request(restricted(), backend="slurm")
    with pytest.raises(ConfigError, match="--resource is for batch jobs") as caught:
        build_request(restricted(), resources=["nodes=1"])
    assert "restricted" in (caught.value.hint or "")


def test_slurmrest_on_a_restricted_site_goes_through_the_agent():
    with pytest.raises(ConfigError, match="restricted") as caught:
        build_request(restricted(), backend="slurm")
    assert "slurmrest" in (caught.value.hint or "")  # what does work there
    request = build_request(restricted(), backend="slurmrest", template="generic",
                            params=["program=~/x"], resources=["walltime=1:00:00"])
    assert request.backend == "slurmrest-agent"
    assert request.entrypoint.kind == "approved"
    assert request.resources["walltime_s"] == 3600
    with pytest.raises(ConfigError, match="cannot be chosen"):
        build_request(site(), backend="slurmrest-agent", command="true")


def test_a_command_on_a_restricted_site_is_refused_unless_it_is_the_sites_own():
    with pytest.raises(ConfigError, match="not a command line") as caught:
        build_request(restricted(), command="./solve")
    assert "remote-exec run --site locked" in (caught.value.hint or "")
    own = build_request(restricted(), command=f" {ENTRY} ").entrypoint
    assert (own.kind, own.text) == ("approved", "site")


def test_a_restricted_site_with_a_batch_backend_is_a_configuration_error():
    with pytest.raises(ConfigError, match="restricted") as caught:
        site("locked", restricted=True, backend="slurm")
    assert "test.yaml" in caught.value.message
    assert "remove `backend` or `restricted`" in (caught.value.hint or "")


# -- run, legacy and demo: the same function ------------------------------------------------

def test_legacy_builds_what_run_builds(inputs, tmp_path):
    cluster = site(backend="slurm", resources={"nodes": 3})
    args = legacy.parse(["client_name:lab", "client_cmd:./solve in.dat",
                         "client_files:" + ",".join(inputs)])
    assert args is not None
    from_legacy = legacy.build(args, cluster, tmp_path)
    from_run = build_request(cluster, command="./solve in.dat", inputs=inputs, into=tmp_path)
    assert comparable(from_legacy) == comparable(from_run)
    assert from_legacy.backend == "slurm" and from_legacy.resources["nodes"] == 3


def test_legacy_gets_the_same_checks_as_run(inputs, tmp_path):
    args = legacy.parse(["client_name:locked", "client_cmd:./work.sh",
                         "client_files:" + ",".join(inputs)])
    assert args is not None
    with pytest.raises(ConfigError, match="client_cmd") as caught:
        legacy.build(args, restricted(), tmp_path)
    assert "remote-exec run --site locked" in (caught.value.hint or "")
    # the site's own entrypoint, named as client_cmd, is the approved one
    own = legacy.parse(["client_name:locked", f"client_cmd:{ENTRY}", "client_files:"])
    assert own is not None
    request = legacy.build(own, restricted(), tmp_path)
    assert request.backend == backends.RESTRICTED and request.entrypoint.kind == "approved"
    missing = legacy.parse(["client_name:lab", "client_cmd:true",
                            f"client_files:{tmp_path / 'nope.dat'}"])
    assert missing is not None
    with pytest.raises(InputError):
        legacy.build(missing, site(), tmp_path)


def test_demo_builds_what_run_builds(tmp_path):
    for name, text in demo.SAMPLE_INPUTS.items():
        (tmp_path / name).write_text(text)
    sandbox = site("sandbox", entrypoint=ENTRY)
    from_demo = demo.demo_request(sandbox, tmp_path, tmp_path / "results")
    from_run = build_request(sandbox, inputs=[str(tmp_path / n) for n in demo.SAMPLE_INPUTS],
                             into=tmp_path / "results")
    assert comparable(from_demo) == comparable(from_run)
    assert from_demo.entrypoint.kind == "site" and from_demo.backend == backends.DEFAULT
    with pytest.raises(ConfigError, match="--resource"):  # the same checks: none sneaks by
        build_request(sandbox, resources=["nodes=1"])


# -- the registry feeds the CLI and the configuration ---------------------------------------

def test_the_cli_backend_choices_are_the_registry_s():
    from remote_exec import cli

    option = next(p for p in cli.run.params if p.name == "backend")
    assert backends.RESTRICTED not in backends.choosable()
    for name in backends.choosable():  # each one is taken, and named in --help
        assert option.type.convert(name, option, None) == name
        assert f"{name}: {backends.get(name).summary}" in option.help
    for name in ("lsf", backends.RESTRICTED):  # unknown, or not to be chosen by name
        with pytest.raises(click.BadParameter):
            option.type.convert(name, option, None)


def test_every_backend_s_commands_are_attached():
    import importlib

    from remote_exec import cli

    attached = 0
    for name in backends.names():
        target = backends.get(name).commands
        if target:
            module, _, attr = target.partition(":")
            group = getattr(importlib.import_module(module), attr)
            assert cli.main.commands[group.name] is group
            attached += 1
    assert attached and "fujitsu" in cli.main.commands
    assert set(cli.main.commands["fujitsu"].commands) == {"jobs", "job", "cancel", "sync-status"}


def test_the_configuration_schema_takes_its_backends_from_the_registry(tmp_path):
    path = tmp_path / "c.yaml"
    parse_config("sites:\n  c:\n    backend: torque\n", path)
    config = parse_config(f"sites:\n  c:\n    backend: {backends.RESTRICTED}\n", path)
    with pytest.raises(ConfigError, match="sites.c: backend 'agent' cannot be chosen"):
        config.site("c")
    config = parse_config("sites:\n  c:\n    backend: lsf\n", path)
    with pytest.raises(ConfigError, match="sites.c: unknown backend 'lsf'"):
        config.site("c")
    config = parse_config("sites:\n  f:\n    backend: fujitsu\n", path)
    with pytest.raises(ConfigError, match="needs a `fujitsu:` section"):
        config.site("f")
    config = parse_config("sites:\n  f:\n    fujitsu: {api_url: 'https://x', bucket: bkt, "
                          "hpc_dir: '../up'}\n", path)
    with pytest.raises(ConfigError, match="invalid hpc_dir"):
        config.site("f")
