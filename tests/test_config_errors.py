"""A broken configuration file: exit 78, and the message names the file, the line and the key.

Everything goes through the real ``remote-exec`` CLI; none of these may reach the network.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import site_entry

#: (id, YAML text, expected line, words the message must contain)
CASES = [
    ("unknown-key-in-site", """\
        # a comment, so line numbers are not trivially 1
        sites:
          other:
            host: other.example
          loop:
            host: 127.0.0.1
            port: 2222
            colour: blue
            root: /tmp
        """, 8, ["colour", "unknown key", "sites.loop"]),
    ("wrong-type-port", """\
        sites:
          first:
            host: first.example
            port: 22
          loop:
            host: 127.0.0.1
            port: "abc"
        """, 7, ["port", "integer"]),
    ("wrong-type-port-unquoted", """\
        sites:
          loop:
            host: 127.0.0.1

            port: abc
        """, 5, ["port", "integer"]),
    ("broken-yaml-mapping", """\
        sites:
          loop:
            host: 127.0.0.1
            user: a: b
            port: 22
        """, 4, ["not valid YAML"]),
    ("broken-yaml-tab", """\
        sites:
          loop:
            host: 127.0.0.1
        \tport: 22
        """, 4, ["not valid YAML"]),
    ("unknown-key-in-defaults", """\
        defaults:
          root: /tmp
          rooot: /var/tmp
        sites:
          loop:
            host: 127.0.0.1
        """, 3, ["rooot", "unknown key", "defaults"]),
    ("unknown-top-level-key", """\
        sites:
          loop:
            host: 127.0.0.1
        site:
          other:
            host: x
        """, 4, ["'site'", "unknown key"]),
    ("bad-enum", """\
        sites:
          loop:
            host: 127.0.0.1
            cleanup: sometimes
        """, 4, ["cleanup"]),
    ("templates-not-a-list-of-strings", """\
        sites:
          loop:
            host: 127.0.0.1
            templates:
              - generic
              - {name: other}
        """, 6, ["templates"]),
]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broken config.yaml"  # a space in the name, to see it quoted or not
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("how", ["--config", "env"])
@pytest.mark.parametrize("text, line, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_config_error_names_file_line_and_key(cli, workdir, tmp_path, remote_root,
                                              text, line, words, how):
    path = _write(tmp_path, text)
    (workdir / "in.dat").write_text("x\n")
    if how == "--config":
        proc = cli("run", "--config", str(path), "--site", "loop", "--cmd", "touch ran",
                   "in.dat", cwd=workdir)
    else:
        proc = cli("run", "--site", "loop", "--cmd", "touch ran", "in.dat", cwd=workdir,
                   extra_env={"REMOTE_EXEC_CONFIG": str(path)})
    assert proc.returncode == 78, proc.stderr
    err = proc.stderr
    assert f"{path}:{line}:" in err, f"expected {path}:{line}: in {err!r}"
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3, err  # one error line (and a hint), no noise
    assert list(remote_root.iterdir()) == []
    assert not (workdir / "ran").exists()


def test_unknown_key_lists_the_allowed_keys(cli, workdir, tmp_path):
    path = _write(tmp_path, CASES[0][1])
    proc = cli("run", "--config", str(path), "--site", "loop", "--cmd", "true", cwd=workdir)
    assert proc.returncode == 78, proc.stderr
    allowed = re.search(r"allowed keys: (.*)", proc.stderr)
    assert allowed, proc.stderr
    for key in ("host", "port", "user", "identity_file", "known_hosts", "root", "templates"):
        assert key in allowed.group(1)


def test_unknown_key_in_legacy_lists_the_legacy_keys(cli, workdir, tmp_path):
    """The allowed keys offered must be those of the section that has the typo."""
    path = _write(tmp_path, """\
        sites:
          loop:
            host: 127.0.0.1
        legacy:
          solver_log_bas: /srv/log
        """)
    proc = cli("run", "--config", str(path), "--site", "loop", "--cmd", "true", cwd=workdir)
    assert proc.returncode == 78, proc.stderr
    assert f"{path}:5:" in proc.stderr and "solver_log_bas" in proc.stderr
    allowed = re.search(r"allowed keys: (.*)", proc.stderr)
    assert allowed, proc.stderr
    assert "solver_log_base" in allowed.group(1)
    assert "identity_file" not in allowed.group(1)  # a site key is no help here


def test_missing_config_file_given_with_option(cli, workdir, tmp_path):
    missing = tmp_path / "nowhere.yaml"
    proc = cli("run", "--config", str(missing), "--site", "loop", "--cmd", "true", cwd=workdir)
    assert proc.returncode == 78, proc.stderr
    assert str(missing) in proc.stderr and "does not exist" in proc.stderr


def test_missing_config_file_from_environment(cli, workdir, tmp_path):
    missing = tmp_path / "nowhere.yaml"
    proc = cli("run", "--site", "loop", "--cmd", "true", cwd=workdir,
               extra_env={"REMOTE_EXEC_CONFIG": str(missing)})
    assert proc.returncode == 78, proc.stderr
    assert str(missing) in proc.stderr and "REMOTE_EXEC_CONFIG" in proc.stderr


def test_top_level_not_a_mapping(cli, workdir, tmp_path):
    path = _write(tmp_path, "- just\n- a list\n")
    proc = cli("run", "--config", str(path), "--site", "loop", "--cmd", "true", cwd=workdir)
    assert proc.returncode == 78, proc.stderr
    assert f"{path}:1:" in proc.stderr


@pytest.mark.parametrize("site", ["-oProxyCommand=touch x", "has space", ""])
def test_bad_site_names_are_refused(cli, workdir, site):
    proc = cli("run", "--site", site, "--cmd", "true", cwd=workdir)
    assert proc.returncode == 78, proc.stderr
    assert "invalid site or host name" in proc.stderr


def test_a_return_pattern_that_climbs_out_is_refused(cli, workdir, tmp_path):
    config = tmp_path / "bad-returns.yaml"
    config.write_text("sites:\n  loop:\n    host: 127.0.0.1\n    never_return: ['../x']\n")
    proc = cli("run", "--config", str(config), "--site", "loop", "--cmd", "true", cwd=workdir)
    assert proc.returncode == 78
    assert "never_return" in proc.stderr and "'..' is not allowed" in proc.stderr


# -- issue 13, 10d-f: duplicate keys, every error at once, sizes with units ----------------

def test_a_duplicate_key_is_refused_with_both_lines(cli, workdir, tmp_path, remote_root):
    path = _write(tmp_path, """\
        sites:
          loop:
            host: 127.0.0.1
            port: 22

            port: 2222
        """)
    proc = cli("run", "--config", str(path), "--site", "loop", "--cmd", "touch ran",
               cwd=workdir)
    assert proc.returncode == 78, proc.stderr
    assert f"{path}:6:" in proc.stderr and "line 4" in proc.stderr, proc.stderr
    assert "duplicate key 'port'" in proc.stderr
    assert list(remote_root.iterdir()) == []


def test_every_schema_error_is_listed_at_once(cli, workdir, tmp_path, remote_root):
    path = _write(tmp_path, """\
        sites:
          loop:
            host: 127.0.0.1
            port: "abc"
            colour: blue
          other:
            host: other.example
            cleanup: sometimes
            rsync_threshold: lots
            resources:
              memory: 4 bananas
        legacy:
          solver_log_bas: /srv/log
        """)
    proc = cli("run", "--config", str(path), "--site", "loop", "--cmd", "touch ran",
               cwd=workdir)
    assert proc.returncode == 78, proc.stderr
    expected = {4: "port", 5: "colour", 8: "cleanup", 9: "rsync_threshold",
                11: "memory", 13: "solver_log_bas"}
    for line, key in expected.items():
        assert re.search(rf"{re.escape(str(path))}:{line}: .*{key}", proc.stderr), \
            f"line {line} ({key}) not reported in {proc.stderr!r}"
    assert "Traceback" not in proc.stderr
    assert list(remote_root.iterdir()) == []


@pytest.mark.parametrize("threshold, method", [("1K", "rsync"), ("1KiB", "rsync"),
                                               ("1GB", "sftp"), ("512M", "sftp"),
                                               (1024, "rsync")])
def test_sizes_take_units_everywhere(cli, workdir, tmp_path, sshd, remote_root,
                                     threshold, method):
    """`rsync_threshold: 1GB` is accepted like `memory: 4G`, and means bytes: a 4 KiB
    input goes by rsync from a 1K threshold, by SFTP under a 1GB one."""
    entry = site_entry(sshd, remote_root, transfer="auto", rsync_threshold=threshold,
                       resources={"memory": "4GiB"})
    path = tmp_path / "sizes.yaml"
    path.write_text(yaml.safe_dump({"sites": {"sized": entry}}))
    (workdir / "in.dat").write_bytes(b"x" * 4096)
    proc = cli("run", "--config", str(path), "--site", "sized", "--json", "--cmd", "true",
               "in.dat", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert f"by {method}" in proc.stderr, proc.stderr


def test_an_invalid_size_names_the_units(cli, workdir, tmp_path):
    path = _write(tmp_path, """\
        sites:
          loop:
            host: 127.0.0.1
            rsync_threshold: 1 GBx
        """)
    proc = cli("run", "--config", str(path), "--site", "loop", "--cmd", "true", cwd=workdir)
    assert proc.returncode == 78, proc.stderr
    assert f"{path}:4:" in proc.stderr and "invalid size" in proc.stderr
    assert "K, M, G, T" in proc.stderr


def test_the_compiled_schema_is_kept_and_a_bad_copy_is_recompiled(tmp_path, monkeypatch):
    """The validator's compiled code is kept in the state directory (every command pays
    ~80 ms to compile it otherwise); a damaged copy is compiled again, and the checks
    are the same either way."""
    from remote_exec import config

    monkeypatch.setenv("REMOTE_EXEC_STATE_DIR", str(tmp_path / "state"))
    bad = {"sites": {"a": {"host": "h", "transfer": "carrier-pigeon"}}}
    good = {"sites": {"a": {"host": "h"}}}
    for round_ in ("compiled", "loaded", "damaged"):
        monkeypatch.setattr(config, "_VALIDATOR", None)
        if round_ == "damaged":
            (kept,) = (tmp_path / "state" / "compiled").iterdir()
            kept.write_bytes(b"\x00not marshal")
        assert config._schema_problems(good, None) == []
        assert config._schema_problems(bad, None), round_
        (kept,) = (tmp_path / "state" / "compiled").iterdir()
        assert kept.name.startswith("config-schema-") and kept.stat().st_size > 1000
