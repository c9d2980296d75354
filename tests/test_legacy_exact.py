"""Issue 18, points 1-6: `remote-exec legacy` reads `client_files` and `client_cmd` as
the original MInt client's local shell did, and its solver_execute.log lines pair up.

The expected results are written from the original's documented behaviour: its
`client_files` list and command line passed through the MInt host's shell (`sh`:
field splitting at blanks, `~`, `$VAR`, sorted globs, backticks and `$(...)` run
locally), the files went through `rsync -av -L` (a trailing `/` copies a directory's
contents), and the whole run directory came back. Where remote-exec differs on
purpose, the test says so and the README's MInt section lists it.

Unit tests of the expansion rules first, then each point through the real CLI and a
real loopback sshd (the fixtures of conftest.py, as tests/test_legacy.py uses them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from remote_exec import legacy
from remote_exec.errors import ConfigError, InputError

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d: (start|normal end|abnormal end): (\S+): unknown$"
)
ENV = {"A": "x y", "EMPTY": "", "Q": "it's", "BANG": "a!b", "SEMI": "v;touch pwned",
       "PAD": "  p  q ", "STAR": "*.dat"}


def cmd(text: str, env: dict[str, str] | None = None) -> str:
    return legacy.expand_command(text, ENV if env is None else env, pid=4242)


def refused(text: str, *needles: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        cmd(text)
    full = str(caught.value)
    for needle in needles:
        assert needle in full, full
    return caught.value


# -- point 4, unit: what the original's local shell expanded, expanded here --------------------

@pytest.mark.parametrize("text", [
    "./solve in.dat", "cat a b > out", "echo 'it''s' \"q\" a\\ b", "x=1; echo done",
    "~/misrc_remote_workflow/scripts/execute_remote-side_program_ssh.sh",
    "echo *.dat ~ [ab]", "echo 'unterminated",
])
def test_a_command_without_dollar_or_backtick_is_sent_unchanged(text):
    assert cmd(text) == text


@pytest.mark.parametrize("text, sent", [
    # unquoted: split into words at blanks (sh's field splitting), never re-read as syntax
    ("echo $A", "echo x y"),
    ("echo a$A\"b\"", "echo ax y\"b\""),
    ("echo ${A}z", "echo x yz"),
    ("echo $PAD.", "echo  p q ."),
    ("echo $SEMI", "echo 'v;touch' pwned"),
    ("echo $STAR", "echo '*.dat'"),
    ("echo $Q", "echo 'it'\"'\"'s'"),
    ("echo $EMPTY end", "echo  end"),
    # double-quoted: one word
    ("echo \"$A\"", "echo \"\"'x y'\"\""),
    ("echo \"<$SEMI>\"", "echo \"<\"'v;touch pwned'\">\""),
    ("echo \"$SEMI\"", "echo \"\"'v;touch pwned'\"\""),
    ("echo \"[$EMPTY]\"", "echo \"[]\""),
    # csh reads ! in single quotes as history: written as sh and csh both read it
    ("echo \"$BANG\"", "echo \"\"'a'\\!'b'\"\""),
    # defaults, as sh
    ("echo ${NOPE:-def} ${EMPTY:-def} ${EMPTY-def} ${A-def}", "echo def def  x y"),
    # $$: the id of the local process that read the command (the original: its shell's)
    ("mkdir tmp$$", "mkdir tmp4242"),
    # single quotes: literal, as sh reads them, and still quoted for the remote shell
    ("echo '$A' '`date`' '$(date)'", "echo '$A' '`date`' '$(date)'"),
    # \$ and \` lose the backslash, as the original's local shell removed it: the remote
    # shell expands them (the original's way to leave an expansion to the remote side)
    ("echo \\$PWD \"\\$HOME\" \\`hostname\\`", "echo $PWD \"$HOME\" `hostname`"),
    ("echo \\\\ \\a \"\\\"\"", "echo \\\\ \\a \"\\\"\""),
    # a $ that starts no expansion is a plain $
    ("echo $ cost$ \"a$\" $/ $:x $A", "echo $ cost$ \"a$\" $/ $:x x y"),
    # a comment is not expanded; # inside a word is no comment
    ("echo a#$A # $NOPE `x`", "echo a#x y # $NOPE `x`"),
    ("echo $A # c\necho $A", "echo x y # c\necho x y"),
    # operators end words
    ("echo $A;echo $A|cat>$EMPTY", "echo x y;echo x y|cat>"),
])
def test_expansions_in_the_command(text, sent):
    assert cmd(text) == sent


def test_the_remote_shell_reads_the_words_the_local_shell_made(tmp_path):
    """Run the sent command through a real sh: the words are the ones sh makes of the
    original command with the same environment (field splitting included)."""
    import subprocess

    env = {"A": "x  y", "B": "a'b\"c$d`e", "PATH": os.environ["PATH"]}
    original = 'printf "[%s]" $A "$A" "${B}" pre$A\'lit$A\' \\$NOPE'
    sent = legacy.expand_command(original, env)
    ran = subprocess.run(["sh", "-c", sent], capture_output=True, text=True, env={
        "PATH": os.environ["PATH"], "NOPE": "remote"}, check=True)
    local = subprocess.run(["sh", "-c", original.replace("\\$NOPE", "remote")],
                           capture_output=True, text=True, env=env, check=True)
    assert ran.stdout == local.stdout == "[x][y][x  y][a'b\"c$d`e][prex][ylit$A][remote]"


def test_pwd_is_the_current_directory_as_sh_makes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PWD", "/somewhere/stale")  # a caller that is no shell
    assert legacy.expand_command("echo $PWD") == f"echo {tmp_path}"
    (tmp_path / "via").symlink_to(tmp_path)
    monkeypatch.setenv("PWD", str(tmp_path / "via"))  # right, through a symlink: kept
    assert legacy.expand_command("echo $PWD") == f"echo {tmp_path}/via"


def test_an_unset_variable_is_an_error_naming_it():
    err = refused("echo $MISYSTEM_NOPE", "$MISYSTEM_NOPE is not set", "export MISYSTEM_NOPE",
                  "\\$MISYSTEM_NOPE")
    assert "client_cmd" in err.message
    refused("echo ${NOPE}", "$NOPE is not set")
    refused("echo \"$NOPE\"", "$NOPE is not set")


@pytest.mark.parametrize("text, needle", [
    ("echo `date`", "command substitution `...`"),
    ("echo \"`date`\"", "command substitution `...`"),
    ("echo $(date)", "command substitution $(...)"),
    ("echo \"$(hostname)\"", "command substitution $(...)"),
    ("echo $((1 + 2))", "arithmetic expansion"),
])
def test_command_substitution_is_refused_with_how_to_write_it(text, needle):
    err = refused(text, needle, "on the MInt host")
    assert err.hint and "in the module" in err.hint


@pytest.mark.parametrize("special", ["?", "!", "#", "*", "@", "-", "0", "1", "9"])
def test_the_local_shells_special_parameters_are_refused(special):
    refused(f"./solve; echo ${special}", f"${special} is a parameter of the original's local "
            "shell", f"write \\${special}")


@pytest.mark.parametrize("text, needle", [
    ("echo ${#A}", "${#A} is not supported"),
    ("echo ${A%y}", "${A%y} is not supported"),
    ("echo ${1}", "${1} is not supported"),
    ("echo ${A:-$B}", "must be plain text"),
    ("echo ${A", "unterminated ${"),
    ("echo $'a\\n'", "bash's, not sh's"),
    ("echo \"$A", "unterminated double quote"),
    ("echo '$A", "unterminated single quote"),
    ("cat <<EOF\n$A\nEOF", "here-document"),
])
def test_what_cannot_be_expanded_faithfully_is_refused(text, needle):
    refused(text, needle)


def test_a_value_with_a_line_break_is_refused():
    with pytest.raises(ConfigError, match="line break"):
        cmd("echo \"$NL\"", {"NL": "a\nb"})


# -- points 1-3, unit: client_files as the original's shell and rsync read it ---------------

def test_names_are_split_at_commas_and_blanks():
    assert legacy.split_files("a.dat, b.dat ,c.dat") == ["a.dat", "b.dat", "c.dat"]
    assert legacy.split_files(" a.dat,,b.dat  c.dat,") == ["a.dat", "b.dat", "c.dat"]
    assert legacy.split_files("a.dat,\tb.dat\n") == ["a.dat", "b.dat"]
    assert legacy.split_files("") == []
    args = legacy.parse(["client_name:h", "client_cmd:true", "client_files:a.dat, b.dat"])
    assert args is not None and args.client_files == ["a.dat", "b.dat"]


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("b.dat", "a.dat", "c.txt", ".hidden.dat", "ab1.dat", "ab2.dat"):
        (tmp_path / name).write_text(name)
    sub = tmp_path / "subdir"
    sub.mkdir()
    for name in ("s2.dat", "s1.dat", ".dot"):
        (sub / name).write_text(name)
    (sub / "inner").mkdir()
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def files(*words: str, env: dict[str, str] | None = None) -> list[str]:
    return legacy.expand_files(list(words), {**ENV, **(env or {})})


def test_globs_expand_sorted_like_sh(tree):
    assert files("*.dat") == ["a.dat", "ab1.dat", "ab2.dat", "b.dat"]  # no dot files
    assert files("ab?.dat") == ["ab1.dat", "ab2.dat"]
    assert files("[ab].dat") == ["a.dat", "b.dat"]
    assert files(".*.dat") == [".hidden.dat"]
    assert files("subdir/s*") == ["subdir/s1.dat", "subdir/s2.dat"]
    assert files("c.txt", "*.dat") == ["c.txt", "a.dat", "ab1.dat", "ab2.dat", "b.dat"]


def test_an_unmatched_glob_is_an_error_naming_it(tree):
    with pytest.raises(InputError) as caught:
        files("a.dat", "*.csv", "z?.dat")
    assert "no file matches '*.csv'" in caught.value.message
    assert "no file matches 'z?.dat'" in caught.value.message  # every problem at once


def test_an_unmatched_word_that_names_a_file_is_that_file(tree):
    """sh keeps an unmatched glob (or ~nouser) as it is, and rsync finds a file of
    that very name."""
    (tree / "odd[1].dat").write_text("x")
    (tree / "~nouser").mkdir()
    (tree / "~nouser" / "f").write_text("x")
    assert files("odd[1].dat", "~nouser/f") == ["odd[1].dat", "~nouser/f"]
    (tree / "odd1.dat").write_text("x")
    assert files("odd[1].dat") == ["odd1.dat"]  # a match wins, as in sh


def test_tilde_and_variables_expand(tree, monkeypatch):
    monkeypatch.setenv("HOME", str(tree / "subdir"))
    user = __import__("pwd").getpwuid(os.getuid())
    assert files("~/s1.dat") == [f"{tree}/subdir/s1.dat"]
    assert files("~") == [f"{tree}/subdir"]
    assert files(f"~{user.pw_name}/x") == [f"{user.pw_dir}/x"]
    env = {"D": str(tree / "subdir"), "N": "a.dat", "TWO": "a.dat  b.dat", "G": "ab*"}
    assert files("$D/s1.dat", "${D}/s2.dat", "$N", env=env) == [
        f"{tree}/subdir/s1.dat", f"{tree}/subdir/s2.dat", "a.dat"]
    assert files("$TWO", env=env) == ["a.dat", "b.dat"]  # unquoted: split, as sh
    assert files("$G.dat", env=env) == ["ab1.dat", "ab2.dat"]  # and globbed, as sh
    assert files("${NOPE:-a.dat}", env=env) == ["a.dat"]


def test_an_unset_variable_or_unknown_user_is_an_error_naming_it(tree):
    with pytest.raises(InputError) as caught:
        files("$NOPE_DIR/a.dat", "~no_such_user_here/a.dat")
    assert "$NOPE_DIR is not set" in caught.value.message
    assert "~no_such_user_here names no user" in caught.value.message


@pytest.mark.parametrize("word", ["`ls`", "$(ls)", "'a.dat'", "\"a.dat\"", "a\\ b"])
def test_shell_syntax_in_client_files_is_refused(tree, word):
    with pytest.raises(InputError, match="not supported in client_files"):
        files(word)


def test_a_trailing_slash_stages_the_directorys_contents(tree):
    assert files("subdir/") == ["subdir/.dot", "subdir/inner", "subdir/s1.dat",
                                "subdir/s2.dat"]
    assert files("subdir/.") == files("subdir/")
    assert files("empty/") == []
    assert files("subdir") == ["subdir"]  # no slash: the directory itself
    assert files("sub*/") == files("subdir/")  # a glob ending in / matches directories
    with pytest.raises(InputError, match="not a directory"):
        files("a.dat/")


def test_the_same_file_named_twice_is_staged_once(tree):
    assert files("a.dat", "*.dat", "./a.dat") == ["a.dat", "ab1.dat", "ab2.dat", "b.dat"]


def test_trailing_slash_names_are_checked_against_the_other_inputs(tree):
    from remote_exec.inputs import check_inputs

    (tree / "s1.dat").write_text("top")
    with pytest.raises(InputError) as caught:
        check_inputs(files("s1.dat", "subdir/"))
    assert "'subdir/s1.dat' and 's1.dat' would both be staged as 's1.dat'" \
        in caught.value.message
    staged = check_inputs(files("subdir/", "a.dat"))
    assert [(i.name, i.is_dir) for i in staged] == [
        (".dot", False), ("inner", True), ("s1.dat", False), ("s2.dat", False),
        ("a.dat", False)]


# -- point 5, unit: the log lines pair up ----------------------------------------------------

def test_an_end_line_always_follows_a_start_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MISYSTEM_SITEID", "s1")
    monkeypatch.delenv("REMOTE_EXEC_SOLVER_LOG_BASE", raising=False)
    log = legacy.SolverLog(str(tmp_path), "abaqus")
    log.end(ok=False)  # failed before the run began
    log2 = legacy.SolverLog(str(tmp_path), "abaqus")
    log2.start()
    log2.start()
    log2.end(ok=True)
    assert solver_lines(tmp_path, "s1") == [
        ("start", "abaqus"), ("abnormal end", "abaqus"), ("start", "abaqus"),
        ("normal end", "abaqus")]


def solver_lines(base: Path, site_id: str) -> list[tuple[str, str]]:
    log = base / site_id / "solver_logs" / "solver_execute.log"
    matches = [LINE.match(line) for line in log.read_text().splitlines()]
    assert all(matches), log.read_text()
    return [(m.group(1), m.group(2)) for m in matches]  # type: ignore[union-attr]


# -- through the real CLI and a loopback sshd ------------------------------------------------

def write(work: Path, *names: str) -> None:
    for name in names:
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{name}\n")


def run_dirs(remote_root: Path) -> list[Path]:
    return [p for p in remote_root.iterdir() if p.is_dir()]


def listing(text: str) -> list[str]:
    """The names a remote `ls -A` saw, without remote-exec's own and the listing itself."""
    skip = {".remote-exec", "remote_program_exec.log", "listing.txt"}
    return [n for n in text.split() if n not in skip]


def test_point1_blanks_around_commas(cli, workdir):
    write(workdir, "a.dat", "b.dat", "c.dat")
    proc = cli("legacy", "client_name:loop", "client_cmd:cat a.dat b.dat c.dat > out",
               "client_files:a.dat, b.dat,  c.dat", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "out").read_text() == "a.dat\nb.dat\nc.dat\n"


def test_point2_globs_tilde_and_variables(cli, workdir, tmp_path):
    write(workdir, "x1.dat", "x2.dat", "other.txt", "sel/k.dat")
    home = tmp_path / "home"
    write(home, "h.dat")
    env = {"HOME": str(home), "DATA": str(workdir / "sel")}
    proc = cli("legacy", "client_name:loop", "client_cmd:ls -A > listing.txt",
               "client_files:*.dat,~/h.dat,$DATA/k.dat", cwd=workdir, extra_env=env)
    assert proc.returncode == 0, proc.stderr
    # what `rsync -av -L *.dat ~/h.dat $DATA/k.dat HOST:DIR` (through sh) stages
    assert listing((workdir / "listing.txt").read_text()) == ["h.dat", "k.dat", "x1.dat",
                                                              "x2.dat"]


def test_point2_unmatched_glob_or_unset_variable_is_an_error(cli, workdir, remote_root):
    write(workdir, "a.dat")
    proc = cli("legacy", "client_name:loop", "client_cmd:true",
               "client_files:a.dat,*.csv,${NOPE_DIR}/b.dat", cwd=workdir)
    assert proc.returncode == 1
    assert "no file matches '*.csv'" in proc.stderr
    assert "$NOPE_DIR is not set" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert run_dirs(remote_root) == []


def test_point3_trailing_slash_stages_the_contents(cli, workdir):
    write(workdir, "top.dat", "subdir/s1.dat", "subdir/s2.dat", "subdir/.dot",
          "subdir/deep/d.dat")
    proc = cli("legacy", "client_name:loop",
               "client_cmd:ls -A > listing.txt; cat s1.dat deep/d.dat > out",
               "client_files:subdir/,top.dat", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    # rsync's `subdir/`: the entries (dot files included) at the top of the run directory
    assert listing((workdir / "listing.txt").read_text()) == [".dot", "deep", "s1.dat",
                                                              "s2.dat", "top.dat"]
    assert (workdir / "out").read_text() == "subdir/s1.dat\nsubdir/deep/d.dat\n"


def test_point3_a_name_clash_through_the_contents_is_refused(cli, workdir, remote_root):
    write(workdir, "s1.dat", "subdir/s1.dat")
    proc = cli("legacy", "client_name:loop", "client_cmd:true",
               "client_files:s1.dat,subdir/", cwd=workdir)
    assert proc.returncode == 1
    assert "'subdir/s1.dat' and 's1.dat' would both be staged as 's1.dat'" in proc.stderr
    assert run_dirs(remote_root) == []


def test_point4_variables_expand_on_the_mint_side(cli, workdir, remote_root):
    write(workdir, "a.dat")
    env = {"MISYSTEM_SITEID": "site00002", "REMOTE_EXEC_SOLVER_LOG_BASE": str(workdir.parent),
           "SPACED": "two  words", "NASTY": "x;touch pwned"}
    proc = cli("legacy", "client_name:loop",
               "client_cmd:printf '%s|' site=$MISYSTEM_SITEID pwd=$PWD \"$SPACED\" $SPACED "
               "\"$NASTY\" lit='$PWD' remote=\\$PWD > out",
               "client_files:a.dat", cwd=workdir, extra_env=env)
    assert proc.returncode == 0, proc.stderr
    words = (workdir / "out").read_text().split("|")
    # $PWD is the module's directory (the MInt side), as the original's local shell gave
    assert words[:6] == ["site=site00002", f"pwd={workdir}", "two  words", "two", "words",
                         "x;touch pwned"]
    assert words[6] == "lit=$PWD"  # single quotes: literal
    assert words[7].startswith(f"remote={remote_root}/")  # \$: the remote shell's
    assert not (workdir / "pwned").exists()


@pytest.mark.parametrize("command, needle", [
    ("echo `hostname` > out", "command substitution `...`"),
    ("echo $(hostname) > out", "command substitution $(...)"),
    ("echo $NOT_SET_ANYWHERE > out", "$NOT_SET_ANYWHERE is not set"),
])
def test_point4_refusals_exit_1_before_connecting(cli, workdir, remote_root, command, needle):
    write(workdir, "a.dat")
    base = workdir.parent / "assets"
    proc = cli("legacy", "client_name:loop", f"client_cmd:{command}", "client_files:a.dat",
               cwd=workdir, extra_env={"MISYSTEM_SITEID": "s9",
                                       "REMOTE_EXEC_SOLVER_LOG_BASE": str(base)})
    assert proc.returncode == 1
    assert needle in proc.stderr and "hint:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert run_dirs(remote_root) == []
    assert not (workdir / "out").exists()
    assert solver_lines(base, "s9") == [("start", "echo"), ("abnormal end", "echo")]


def test_point5_an_error_before_the_run_still_pairs_the_log_lines(cli, workdir, remote_root):
    base = workdir.parent / "assets"
    env = {"MISYSTEM_SITEID": "site00005", "REMOTE_EXEC_SOLVER_LOG_BASE": str(base)}
    missing = cli("legacy", "client_name:loop", "client_cmd:./solve", "client_files:nope.dat",
                  "solver:abaqus", cwd=workdir, extra_env=env)
    assert missing.returncode == 1 and "nope.dat" in missing.stderr
    write(workdir, "a.dat")
    ok = cli("legacy", "client_name:loop", "client_cmd:cp a.dat b.dat", "client_files:a.dat",
             "solver:abaqus", cwd=workdir, extra_env=env)
    assert ok.returncode == 0, ok.stderr
    assert solver_lines(base, "site00005") == [
        ("start", "abaqus"), ("abnormal end", "abaqus"),
        ("start", "abaqus"), ("normal end", "abaqus")]
    assert run_dirs(remote_root) == []  # the failed one created nothing; the good one cleaned


def test_point5_even_an_unreadable_configuration_pairs_the_log_lines(cli, workdir, tmp_path):
    """Before the configuration is read, the log goes where it would by default (or
    $REMOTE_EXEC_SOLVER_LOG_BASE): a start line, then the abnormal end."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("sites: [unclosed\n")
    base = tmp_path / "assets"
    write(workdir, "a.dat")
    proc = cli("legacy", "client_name:loop", "client_cmd:./solve", "client_files:a.dat",
               cwd=workdir, extra_env={"REMOTE_EXEC_CONFIG": str(broken),
                                       "MISYSTEM_SITEID": "s7",
                                       "REMOTE_EXEC_SOLVER_LOG_BASE": str(base)})
    assert proc.returncode == 1 and "broken.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert solver_lines(base, "s7") == [("start", "solve"), ("abnormal end", "solve")]


def test_point6_failure_brings_back_the_outputs_and_drops_escaping_symlinks(
        cli, workdir, tmp_path, remote_root):
    """Deliberate differences (README): the original left only the inputs after a failure
    and brought an outside-pointing symlink back; remote-exec brings the outputs back so
    the failure can be read, and never places a link that leaves the directory."""
    write(workdir, "a.dat")
    outside = tmp_path / "outside.txt"
    outside.write_text("secret\n")
    proc = cli("legacy", "client_name:loop",
               f"client_cmd:echo partial > out.txt; ln -s {outside} link; ln -s out.txt ok; "
               "echo solver exploded; exit 3",
               "client_files:a.dat", cwd=workdir)
    assert proc.returncode == 1
    assert "solver exploded" in proc.stdout
    assert (workdir / "out.txt").read_text() == "partial\n"
    assert not os.path.lexists(workdir / "link")
    assert os.readlink(workdir / "ok") == "out.txt"  # a link inside the directory stays
    assert "not fetched: link ->" in proc.stderr  # the skipped link is reported
    assert len(run_dirs(remote_root)) == 1  # and the failed run's directory is kept
