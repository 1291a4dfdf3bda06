"""RunSpec and to_argv: one description, one command line, both backends."""
from __future__ import annotations

import sys

import pytest

from chspawner.runtime import Bind, RunSpec, to_argv
from chspawner.runtime import launcher  # noqa: I001
from chspawner.runtime.spec import LAUNCH_SCRIPT

# No root, no services: part of the fast unit layer (pytest -m unit).
pytestmark = pytest.mark.unit


def full_spec(**overrides):
    fields = dict(
        image="example/img:1", command=["python3", "-c", "print(1)"],
        binds=["/data", Bind("/scratch", "/mnt/s")], env={"A": "1", "Q": "'q'"},
        unset_env=["SLURM_*"], image_env=True, cwd="/work", write_fake="2g",
        home=True, private_tmp=True, passwd=False, uid=0, gid=0,
        storage="/store", verbosity=2)
    fields.update(overrides)
    return RunSpec(**fields)


def test_builtin_argv_runs_the_launcher_isolated():
    argv = to_argv(RunSpec("img", ["true"]))
    assert argv == [sys.executable, "-I", "-S", LAUNCH_SCRIPT, "img", "--", "true"]


def test_ch_run_argv(monkeypatch):
    monkeypatch.delenv("CHSPAWNER_CH_RUN", raising=False)
    assert to_argv(RunSpec("img", ["true"]), "ch-run") == ["ch-run", "img", "--", "true"]
    assert to_argv(RunSpec("img", ["true"]), "ch-run", ch_run="/opt/ch/bin/ch-run")[0] \
        == "/opt/ch/bin/ch-run"


def test_both_backends_get_the_same_options():
    spec = full_spec()
    builtin, ch_run = to_argv(spec, "builtin"), to_argv(spec, "ch-run")
    assert builtin[4:] == ch_run[1:]


def test_argv_parses_back_to_the_spec():
    """What to_argv writes, the launcher reads as meant."""
    spec = full_spec()
    o = launcher.parse_args(to_argv(spec)[4:])
    assert o.image == spec.image and o.command == list(spec.command)
    assert o.binds == [("/data", "/data"), ("/scratch", "/mnt/s")]
    assert o.cd == "/work" and o.write_fake == "2g"
    assert o.home and o.private_tmp and not o.passwd
    assert (o.uid, o.gid, o.storage, o.verbose) == (0, 0, "/store", 2)
    assert o.env_ops == [("image", None), ("unset", "SLURM_*"),
                         ("set", "A=1"), ("set", "Q=''q''")]


def test_env_values_keep_their_quotes():
    name, value = launcher.parse_env_line("Q=''q''", "x")
    assert (name, value) == ("Q", "'q'")


def test_env_expansion_can_be_turned_off():
    o = launcher.parse_args(to_argv(RunSpec("i", ["c"], env={"X": "$Y"},
                                            env_expand=False))[4:])
    assert not o.env_expand


def test_join_options_round_trip():
    o = launcher.parse_args(to_argv(RunSpec("i", ["c"], join=True, join_ct=4,
                                            join_tag="step"))[4:])
    assert (o.join, o.join_ct, o.join_tag) == (True, 4, "step")
    o = launcher.parse_args(to_argv(RunSpec("i", ["c"], join_pid=42))[4:])
    assert o.join_pid == 42


@pytest.mark.parametrize("kwargs, message", [
    (dict(image="", command=["x"]), "image"),
    (dict(image="i", command=[]), "command"),
    (dict(image="i", command="ls -l"), "command"),
    (dict(image="i", command=["x"], binds=["/a:relative"]), "absolute"),
    (dict(image="i", command=["x"], binds=["/a:/"]), "can't be /"),
    (dict(image="i", command=["x"], binds=["/"]), "can't be /"),
    (dict(image="i", command=["x"], binds=["/a:"]), "missing"),
    (dict(image="i", command=["x"], env={"A=B": "1"}), "name"),
    (dict(image="i", command=["x"], env={"": "1"}), "name"),
    (dict(image="i", command=["x"], unset_env=[""]), "glob"),
    (dict(image="i", command=["x"], writable=True, write_fake=True), "exclude"),
    (dict(image="i", command=["x"], uid=-1), "uid"),
    (dict(image="i", command=["x"], join_pid=3, join=True), "join_pid"),
])
def test_bad_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunSpec(**kwargs)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        to_argv(RunSpec("i", ["c"]), "docker")


def test_launcher_option_parsing_details():
    o = launcher.parse_args(["-wtv", "-bSRC:/dst", "img", "-c", "/x", "--",
                             "cmd", "-w"])
    assert o.writable and o.private_tmp and o.verbose == 1
    assert o.binds == [("SRC", "/dst")] and o.cd == "/x"
    assert o.command == ["cmd", "-w"]
    o = launcher.parse_args(["img", "echo", "-n", "x"])  # command without --
    assert o.command == ["echo", "-n", "x"]
    o = launcher.parse_args(["--backend", "ch-run", "img", "--", "--backend=x"])
    assert o.backend == "ch-run" and o.backend_argv == (0, 1)
    assert o.command == ["--backend=x"]


def test_launcher_env_expansion_rules():
    env = {"BAR": "bar", "EMPTY": ""}
    assert launcher.expand_value("$BAR", env) == "bar"
    assert launcher.expand_value("$BAR:baz", env) == "bar:baz"
    assert launcher.expand_value("baz:$UNSET:qux", env) == "baz:qux"
    assert launcher.expand_value("a:$EMPTY", env) == "a"
    assert launcher.expand_value(":bar:baz::", env) == ":bar:baz::"
    assert launcher.expand_value("x$BAR", env) == "x$BAR"
    assert launcher.expand_value("bar:$", env) == "bar:$"  # a lone "$" stays
    assert launcher.expand_value("$", env) == "$"


@pytest.mark.parametrize("text, number", [
    ("12", 12), (" +7", 7), ("-3", -3), ("2147483647", 2147483647)])
def test_option_numbers_are_read_as_ch_run_reads_them(text, number):
    assert launcher.parse_int(text, "--x") == number


@pytest.mark.parametrize("text, says", [
    ("", "no digits"), ("abc", "no digits"), ("1a", "extra characters"),
    ("1_0", "extra characters"), ("7 ", "extra characters"),
    ("2147483648", "out of range"), ("-9223372036854775809", "out of range")])
def test_bad_option_numbers(text, says):
    with pytest.raises(launcher.Fail, match=says) as caught:
        launcher.parse_int(text, "--x")
    assert caught.value.code == launcher.EXIT_RUNTIME
    assert launcher.parse_int("4(x2)", "V", extra_ok=True) == 4


def test_a_bad_option_value_ends_the_parse_as_a_runtime_error(monkeypatch):
    """ch-run stops at the first bad value (exit 31), whatever follows; an
    unknown option before it is a usage error (64)."""
    o = launcher.parse_args(["-u", "x", "--bogus", "-b", "", "img"])
    assert o.error.code == launcher.EXIT_RUNTIME and "--uid" in str(o.error)
    with pytest.raises(launcher.Fail) as caught:
        launcher.parse_args(["--bogus", "-u", "x", "img"])
    assert caught.value.code == launcher.EXIT_USAGE
    monkeypatch.delenv("CHSPAWNER_BACKEND", raising=False)
    assert launcher.main(["-u", "x", "img", "--", "true"]) == launcher.EXIT_RUNTIME


def test_zero_join_count_and_pid_mean_not_given():
    o = launcher.parse_args(["--join-ct=0", "--join-pid=0", "img", "--", "c"])
    assert o.join and o.join_ct is None and o.join_pid is None


def test_image_names_map_to_store_directories():
    assert launcher.image_name_to_dir("example.com:5000/a/b:1") == "example.com+5000%a%b+1"
