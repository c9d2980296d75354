"""The template library: loading, typed parameters, quoting, ``returns``; one real run.

Most tests need no sshd: a rendered entrypoint is checked with ``sh -n`` and then really
run by ``/bin/sh`` in a scratch run directory, with the site programs (abaqus, as_run,
python, the prepare script) replaced by a stub that records its arguments. Every
hostile value must arrive as exactly one argument and must never run. The last test
runs the ``python`` template through the real CLI against the loopback sshd.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from remote_exec import templates
from remote_exec.agent_file import agent_module
from remote_exec.errors import ConfigError
from remote_exec.templates import Parameter, RemotePath

SHIPPED = ["generic", "abaqus", "code_aster", "python"]

#: values a shell must never interpret; each runs ``touch pwned`` (in the run directory)
#: or worse if it ever reaches the shell unquoted
HOSTILE = [
    "; rm -rf ~",
    "$(id)",
    "`id`",
    "; touch pwned",
    "$(touch pwned)",
    "`touch pwned`",
    "&& touch pwned",
    "| touch pwned",
    "' ; touch pwned ; '",
    "\" ; touch pwned ; \"",
    "it's \"quoted\"",
    "${HOME:?} $HOME",
    "a b\tc",
    "*",
    "~",
    "> out",
    "#comment",
    "\\",
    "-rf",
]
#: hostile values that are also acceptable file names in the run directory
HOSTILE_FILES = [
    "; touch pwned",
    "$(touch pwned)",
    "`touch pwned`",
    "it's \"quoted\" & x",
    "a b*",
    "sub dir/$(id)",
]
#: what only a direct render can carry (bind refuses them): the quoting still holds
UNBINDABLE = ["line one\nline two; touch pwned", "cr\r$(touch pwned)"]


@pytest.fixture(scope="session")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site program that appends ``[name, *args]`` as JSON to ``$STUB_LOG``.

    It fails (exit 3) when an argument contains ``FAIL``.
    """
    directory = tmp_path_factory.mktemp("stubs")
    path = directory / "argv-stub"
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "with open(os.environ['STUB_LOG'], 'a') as log:\n"
        "    log.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "sys.exit(3 if any('FAIL' in a for a in sys.argv[1:]) else 0)\n"
    )
    path.chmod(0o755)
    assert re.fullmatch(r"[A-Za-z0-9_./~+-]+", str(path)), path  # the path pattern
    return path


@pytest.fixture
def rundir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "home").mkdir()
    return run


def run_script(script: str, rundir: Path) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """``sh -n`` the script, run it with ``/bin/sh`` in ``rundir``; return the stub calls."""
    entry = rundir.parent / "entrypoint.sh"
    entry.write_text(script)
    check = subprocess.run(["sh", "-n", str(entry)], capture_output=True, text=True)
    assert check.returncode == 0, f"sh -n refused the script:\n{check.stderr}\n{script}"
    log = rundir.parent / "stub.log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(rundir.parent / "home"),  # a `rm -rf ~` that got through hits this
        "STUB_LOG": str(log),
    }
    proc = subprocess.run(["/bin/sh", str(entry)], cwd=rundir, env=env,
                          capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def assert_nothing_ran(rundir: Path) -> None:
    assert not (rundir / "pwned").exists()
    assert not (rundir / "out").exists()
    assert (rundir.parent / "home").is_dir()


def render(name: str, pairs: list[str]) -> str:
    tpl = templates.load_template(name)
    return tpl.render(tpl.bind(pairs))


def params(name: str, values: list[str]) -> list[str]:
    return [f"{name}={v}" for v in values]


@pytest.fixture
def custom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a template into a private template directory and load it."""
    base = tmp_path / "custom-templates"
    base.mkdir()
    monkeypatch.setenv("REMOTE_EXEC_TEMPLATES", str(base))

    def make(spec: str, source: str = "#!/bin/sh\n", name: str = "t") -> templates.Template:
        (base / name).mkdir(exist_ok=True)
        (base / name / "template.yaml").write_text(spec)
        (base / name / "entrypoint.sh.j2").write_text(source)
        return templates.load_template(name)

    return make


# -- loading ------------------------------------------------------------------------------

def test_the_shipped_templates_are_available():
    assert set(SHIPPED) <= set(templates.available())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_template_loads(name):
    tpl = templates.load_template(name)
    assert tpl.description
    assert tpl.source.startswith("#!/bin/sh\n")
    assert tpl.returns and all(isinstance(p, str) for p in tpl.returns)
    for param in tpl.parameters.values():
        assert param.type in agent_module().TYPES
        assert param.description
    text = tpl.describe()
    assert "returns: " + " ".join(tpl.returns) in text
    assert all(p in text for p in tpl.parameters)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_templates_never_insert_a_value_raw(name):
    source = templates.load_template(name).source
    assert not re.search(r"\|\s*raw\b", source)


@pytest.mark.parametrize("name", SHIPPED)
def test_rendering_is_strict(name):
    tpl = templates.load_template(name)
    with pytest.raises(ConfigError, match="failed to render"):
        tpl.render({})  # every name the template uses is undefined


def test_an_undefined_name_is_an_error(custom):
    tpl = custom("parameters: {}\n", "#!/bin/sh\necho {{ nosuch }}\n")
    with pytest.raises(ConfigError, match="nosuch"):
        tpl.render(tpl.bind([]))


def test_an_optional_parameter_without_value_cannot_reach_the_script(custom):
    tpl = custom("parameters:\n  opt: {type: string}\n", "#!/bin/sh\necho {{ opt }}\n")
    with pytest.raises(ConfigError, match="no value"):
        tpl.render(tpl.bind([]))
    assert tpl.render(tpl.bind(["opt=x y"])) == (
        "#!/bin/sh\nRE_opt='x y'\nexport RE_opt\necho 'x y'\n")


# -- hostile values arrive as one argument each, and never run ------------------------------

def test_generic_quotes_every_argument(stub, rundir):
    script = render("generic", [f"program={stub}", *params("args", HOSTILE)])
    proc, calls = run_script(script, rundir)
    assert proc.returncode == 0, proc.stderr
    assert calls == [HOSTILE]
    assert_nothing_ran(rundir)


def test_python_quotes_every_argument(stub, rundir):
    script = render("python", [f"python={stub}", "script=~/site/solver.py",
                               *params("args", HOSTILE)])
    proc, calls = run_script(script, rundir)
    assert proc.returncode == 0, proc.stderr
    home = rundir.parent / "home"
    assert calls == [[f"{home}/site/solver.py", *HOSTILE]]  # ~/ is the (remote) home
    assert_nothing_ran(rundir)


@pytest.mark.parametrize("inp", HOSTILE_FILES)
def test_abaqus_prepares_and_runs_with_every_value_quoted(stub, rundir, inp):
    (rundir / inp).parent.mkdir(parents=True, exist_ok=True)
    (rundir / inp).write_text("*HEADING\n")
    script = render("abaqus", [f"abaqus={stub}", f"prepare={stub}", f"input={inp}",
                               "user=umat; touch pwned.f", "cpus=8", "mp_mode=mpi",
                               "job=Job-1", *params("prepare_args", HOSTILE)])
    proc, calls = run_script(script, rundir)
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        HOSTILE,
        ["job=Job-1", f"input={inp}", "user=umat; touch pwned.f", "cpus=8", "mp_mode=mpi",
         "ask_delete=OFF", "interactive"],
    ]
    assert_nothing_ran(rundir)


def test_abaqus_defaults_follow_the_mint_sample(stub, rundir):
    (rundir / "XX.inp").write_text("*HEADING\n")
    proc, calls = run_script(render("abaqus", [f"abaqus={stub}"]), rundir)
    assert proc.returncode == 0, proc.stderr
    assert calls == [["job=XX", "input=XX.inp", "cpus=1", "mp_mode=threads",
                      "ask_delete=OFF", "interactive"]]


def test_abaqus_without_an_input_file_fails_before_the_solver(stub, rundir):
    proc, calls = run_script(render("abaqus", [f"abaqus={stub}", "job=model"]), rundir)
    assert proc.returncode == 1
    assert "no input file model.inp" in proc.stderr
    assert calls == []


def test_code_aster_runs_each_export_quoted(stub, rundir, tmp_path):
    exports = [f"{name}.export" for name in HOSTILE_FILES]
    setup = tmp_path / "aster-profile.sh"
    # a site profile written without `set -u` in mind
    setup.write_text('echo \'["setup"]\' >> "$STUB_LOG"\n: "$ASTER_UNSET_VARIABLE"\n')
    script = render("code_aster", [f"as_run={stub}", f"setup={setup}",
                                   *params("export", exports)])
    proc, calls = run_script(script, rundir)
    assert proc.returncode == 0, proc.stderr
    assert calls == [["setup"], *[[e] for e in exports]]
    assert_nothing_ran(rundir)


@pytest.mark.parametrize("keep_going, ran", [("false", 2), ("true", 4)])
def test_code_aster_stops_at_the_first_failure_unless_told(stub, rundir, keep_going, ran):
    exports = ["a.export", "FAIL 1.export", "b.export", "FAIL 2.export"]
    script = render("code_aster", [f"as_run={stub}", f"keep_going={keep_going}",
                                   *params("export", exports)])
    proc, calls = run_script(script, rundir)
    assert proc.returncode == 3
    assert calls == [[e] for e in exports[:ran]]


@pytest.mark.parametrize("name, program", [("generic", "program"), ("python", "python")])
def test_values_bind_refuses_are_refused_by_render_too(stub, name, program):
    tpl = templates.load_template(name)
    values = tpl.bind([f"{program}={stub}", "script=/site/s.py"] if name == "python"
                      else [f"{program}={stub}"])
    for bad in [*UNBINDABLE, ""]:
        values["args"] = [*HOSTILE, bad]
        with pytest.raises(ConfigError, match="line break|empty"):
            tpl.render(values)


def test_an_empty_list_element_is_refused():
    tpl = templates.load_template("generic")
    with pytest.raises(ConfigError, match="empty element"):
        tpl.bind(["program=/bin/echo", "args=a", "args="])


@pytest.mark.parametrize("name", SHIPPED)
def test_every_value_of_every_template_is_quoted(name, stub, rundir, tmp_path):
    """Fill every parameter with text a shell would act on; ``sh -n`` and a run agree."""
    tpl = templates.load_template(name)
    nasty = "x; touch pwned $(touch pwned) `touch pwned` 'q' \"q\""
    profile = tmp_path / "empty-profile.sh"  # `setup` is sourced, not run
    profile.write_text("")
    values: dict = {}
    for pname, p in tpl.parameters.items():
        if p.kind == "path":
            value = RemotePath(str(profile if pname == "setup" else stub))
        elif p.kind in ("int", "float"):
            value = 2
        elif p.kind == "bool":
            value = True
        elif p.kind == "choice":
            value = p.choices[0]
        else:
            value = nasty
        values[pname] = [value, value] if p.type == "list" else value
    (rundir / nasty).write_text("*HEADING\n")  # abaqus checks that its input exists
    proc, calls = run_script(tpl.render(values), rundir)
    assert proc.returncode == 0, proc.stderr
    assert calls and all(nasty in call or f"input={nasty}" in call for call in calls)
    assert_nothing_ran(rundir)


# -- typed parameters ---------------------------------------------------------------------

FILE = Parameter(name="f", type="file")


@pytest.mark.parametrize("value, needle", [
    ("/etc/passwd", "absolute"),
    ("../x", "'..'"),
    ("a/../../b", "'..'"),
    ("..", "'..'"),
    ("x/..", "'..'"),
    ("-rf", "option"),
    ("", "empty"),
    ("a\nb", "newline"),
    ("a\x00b", "NUL"),
])
def test_file_parameters_stay_in_the_run_directory(value, needle):
    with pytest.raises(ConfigError, match=needle):
        FILE.convert(value)


@pytest.mark.parametrize("value", ["model.inp", "sub/dir/model.inp", "./x", "a b", "..x", "x.."])
def test_file_parameters_accept_relative_names(value):
    assert FILE.convert(value) == value


def test_file_parameters_are_checked_by_the_templates():
    with pytest.raises(ConfigError, match="absolute"):
        templates.load_template("abaqus").bind(["input=/etc/passwd"])
    with pytest.raises(ConfigError, match="'..'"):
        templates.load_template("code_aster").bind(["export=ok.export",
                                                     "export=a/../../b.export"])
    with pytest.raises(ConfigError, match="pattern"):
        templates.load_template("code_aster").bind(["export=notes.txt"])
    with pytest.raises(ConfigError, match="export"):
        templates.load_template("code_aster").bind([])  # required


def test_file_pattern_applies(custom):
    tpl = custom("parameters:\n  inp: {type: file, pattern: '[a-z]+\\.inp'}\n")
    assert tpl.bind(["inp=model.inp"]) == {"inp": "model.inp"}
    with pytest.raises(ConfigError, match="pattern"):
        tpl.bind(["inp=model.dat"])


@pytest.mark.parametrize("pair, needle", [
    ("cpus=0", "minimum"),
    ("cpus=-4", "minimum"),
    ("cpus=100000", "maximum"),
    ("cpus=four", "not a valid int"),
    ("mp_mode=hybrid", "not one of"),
    ("job=a b", "pattern"),
    ("job=$(id)", "pattern"),
    ("abaqus=/opt/abaqus;id", "pattern"),
    ("abaqus=/opt/../bin/sh", "'..'"),
    ("user=umat.py", "pattern"),
])
def test_abaqus_parameters_are_validated(pair, needle):
    with pytest.raises(ConfigError, match=needle):
        templates.load_template("abaqus").bind([pair])


def test_list_items_are_typed(custom):
    tpl = custom("parameters:\n  n: {type: list, items: int, min: 1}\n")
    assert tpl.bind(["n=1", "n=2"]) == {"n": [1, 2]}
    with pytest.raises(ConfigError, match="minimum"):
        tpl.bind(["n=0"])
    assert tpl.parameters["n"].label == "list[int]"


# -- returns ------------------------------------------------------------------------------

def test_returns_are_parsed():
    assert templates.load_template("generic").returns == ["**"]
    assert templates.load_template("python").returns == ["**"]
    abaqus = templates.load_template("abaqus").returns
    assert {"*.odb", "*.dat", "*.msg", "*.sta", "remote_program_exec.log"} <= set(abaqus)
    aster = templates.load_template("code_aster").returns
    assert {"*.mess", "*.resu", "*.rmed", "remote_program_exec.log"} <= set(aster)


def test_returns_default_to_everything(custom):
    assert custom("description: no returns\n").returns == ["**"]
    assert custom("returns: ['out/*.csv', '**/*.log']\n").returns == ["out/*.csv", "**/*.log"]


@pytest.mark.parametrize("returns", [
    "['/etc/*']", "['../x']", "['a/../b']", "['~/x']", "'*.odb'", "[]", "[3]", "['']",
], ids=["absolute", "parent", "inner-parent", "home", "not-a-list", "empty", "number",
        "empty-pattern"])
def test_bad_returns_are_refused(custom, returns):
    with pytest.raises(ConfigError, match="returns"):
        custom(f"returns: {returns}\n")


# -- the template.yaml schema -----------------------------------------------------------

@pytest.mark.parametrize("spec, needle", [
    ("retruns: ['**']\n", "unknown keys"),
    ("parameters:\n  x: {type: string, defualt: a}\n", "unknown keys"),
    ("parameters:\n  x: {type: str}\n", "type must be one of"),
    ("parameters:\n  x: {type: string, items: file}\n", "only for type list"),
    ("parameters:\n  x: {type: list, items: list}\n", "items must be one of"),
    ("parameters:\n  x: {type: choice}\n", "choices"),
    ("parameters:\n  x: {type: string, choices: [a]}\n", "only for type choice"),
    ("parameters:\n  x: {type: string, min: 1}\n", "only for int and float"),
    ("parameters:\n  x: {type: int, min: one}\n", "must be a number"),
    ("parameters:\n  x: {type: string, pattern: '('}\n", "not valid"),
    ("parameters:\n  x: {type: int, default: 0, min: 1}\n", "minimum"),
    ("parameters:\n  x: {type: string, default: 'a b', pattern: '[a-z]+'}\n", "pattern"),
    ("parameters:\n  x: {type: file, default: /etc/passwd}\n", "absolute"),
    ("parameters:\n  x: {type: list, default: a}\n", "must be a list"),
    ("parameters:\n  bad-name: {type: string}\n", "parameter name"),
    ("parameters:\n  on: {type: bool}\n", "quote it"),
    ("parameters:\n  x: [string]\n", "mapping"),
    ("parameters: [x]\n", "mapping"),
    ("- a\n- b\n", "mapping"),
], ids=["top-level", "parameter", "type", "items-not-list", "items-list", "choice-no-choices",
        "choices-not-choice", "min-on-string", "min-not-number", "bad-regex",
        "default-below-min", "default-vs-pattern", "default-absolute-file",
        "list-default-not-list", "name", "yaml-bool-name", "param-not-mapping",
        "params-not-mapping", "spec-not-mapping"])
def test_bad_template_yaml_is_refused(custom, spec, needle):
    with pytest.raises(ConfigError, match=needle):
        custom(spec)


def test_defaults_are_converted_once(custom):
    tpl = custom("parameters:\n"
                 "  n: {type: int, default: 3}\n"
                 "  flag: {type: bool, default: true}\n"
                 "  p: {type: path, default: ~/bin/tool}\n"
                 "  fs: {type: list, items: file, default: [a.txt, b c.txt]}\n",
                 "#!/bin/sh\necho {{ n }} {{ flag }} {{ p }} {{ fs }}\n")
    values = tpl.bind([])
    assert values == {"n": 3, "flag": True, "p": "~/bin/tool", "fs": ["a.txt", "b c.txt"]}
    assert tpl.render(values).endswith("\necho 3 1 \"$HOME\"/bin/tool a.txt 'b c.txt'\n")
    values["fs"].append("x")  # a run's values never change the template's default
    assert tpl.bind([])["fs"] == ["a.txt", "b c.txt"]


def test_describe_shows_types_and_returns():
    text = templates.load_template("code_aster").describe()
    assert re.search(r"export\s+list\[file\]\s+\(required\)", text)
    assert "returns: *.mess" in text
    assert "keep_going" in text and "(default: false)" in text


# -- end to end: the python template on the loopback sshd ---------------------------------

def test_python_template_runs_on_the_site(cli, workdir, tmp_path, remote_root):
    conf = yaml.safe_load(cli.config.read_text())
    loop = dict(conf["sites"]["loop"], templates=["generic", "python"])
    config = tmp_path / "python-site.yaml"
    config.write_text(yaml.safe_dump({"sites": {"loop": loop}}))
    site = tmp_path / "site-scripts"
    site.mkdir()
    script = site / "shout.py"
    script.write_text(
        "import pathlib, sys\n"
        "text = pathlib.Path(sys.argv[1]).read_text()\n"
        "pathlib.Path('shouted.txt').write_text(text.upper())\n"
        "print('args:', sys.argv[2:])\n"
    )
    (workdir / "words.txt").write_text("hello from mint\n")
    hostile = "$(touch pwned); `touch pwned` 'q'"
    proc = cli("run", "--config", str(config), "--site", "loop", "--template", "python",
               "-p", f"script={script}", "-p", f"python={sys.executable}",
               "-p", "args=words.txt", "-p", f"args={hostile}", "words.txt", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "shouted.txt").read_text() == "HELLO FROM MINT\n"
    log = (workdir / "remote_program_exec.log").read_text()
    assert f"args: {[hostile]!r}" in log
    assert not (workdir / "pwned").exists()
    assert list(remote_root.iterdir()) == []  # cleaned up after success
