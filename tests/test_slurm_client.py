"""chspawner.slurm without Slurm: the pure sbatch builder, the job-id
parser, the state vocabulary, and the client against a fake ``squeue`` /
``scancel`` (a script on PATH that records its arguments and prints what
the test says: the one collaborator faked)."""
from __future__ import annotations

import asyncio
import shlex
import subprocess
from pathlib import Path

import pytest

from chspawner.slurm import (Job, JobState, Resources, SlurmClient, SlurmError, job_environment,
                             parse_job_id, sbatch_argv)

# No root, no services: part of the fast unit layer (pytest -m unit).
pytestmark = pytest.mark.unit

# ------------------------------------------------------------ sbatch_argv --

def test_sbatch_argv_runs_the_site_setup_lines_first_as_given():
    """The admin's set-up lines are the --wrap script's first lines, as
    written (they are shell); the background command and the exec after."""
    argv = sbatch_argv(["server", "--a b"], job_name="j", output="o", chdir="/",
                       background=["watch"], setup=["module load x/1", "export A='b c'"])
    assert argv[-1] == ("--wrap=module load x/1\nexport A='b c'\n"
                        "watch </dev/null >/dev/null 2>&1 & exec server '--a b'")


@pytest.mark.parametrize("field", ["partition", "account", "qos", "reservation", "constraint"])
def test_resources_refuse_a_newline_in_any_value(field):
    with pytest.raises(ValueError, match="control character"):
        Resources(**{field: "a\nb"}).sbatch_options()



def test_sbatch_argv_has_the_fixed_options_then_the_request_then_extra():
    argv = sbatch_argv(["python", "-m", "x"], job_name="j", output="/logs/j-%j.log",
                       chdir="/home/u", resources=Resources(cpus=2, mem_gb=4, hours=3,
                                                            partition="short", gpus=1),
                       extra=["--account=lab"])
    assert argv == ["sbatch", "--parsable", "--job-name=j", "--nodes=1", "--ntasks=1",
                    "--no-requeue", "--export=ALL", "--output=/logs/j-%j.log", "--chdir=/home/u",
                    "--cpus-per-task=2", "--mem=4G", "--time=3:00:00", "--partition=short",
                    "--gpus=1", "--account=lab", "--wrap=exec python -m x"]


def test_sbatch_argv_quotes_the_command_once():
    """Whatever the arguments hold, the batch script's shell hands the
    command exactly these arguments back: nothing runs, nothing splits."""
    command = ["prog", "a b", "it's", "$(touch /tmp/pwned)", "`id`", ";", "x\ny", ""]
    wrap = sbatch_argv(command, job_name="j", output="o", chdir="/")[-1]
    assert wrap == "--wrap=exec " + shlex.join(command)
    script = wrap.removeprefix("--wrap=").replace("exec prog", "printf '%s\\0'", 1)
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, check=True).stdout
    assert out.split(b"\0")[:-1] == [a.encode() for a in command[1:]]


def test_sbatch_argv_starts_the_background_command_first_detached():
    wrap = sbatch_argv(["server", "--x"], job_name="j", output="o", chdir="/",
                       background=["watch", "--report", "a file"])[-1]
    assert wrap == ("--wrap=watch --report 'a file' </dev/null >/dev/null 2>&1 & "
                    "exec server --x")


def test_sbatch_argv_refuses_an_empty_command():
    with pytest.raises(ValueError, match="empty"):
        sbatch_argv([], job_name="j", output="o", chdir="/")


@pytest.mark.parametrize("resources, options", [
    (Resources(), []),
    (Resources(cpus=1), ["--cpus-per-task=1"]),
    (Resources(mem_gb=2, hours=1), ["--mem=2G", "--time=1:00:00"]),
    (Resources(partition="gpu", gpus=0), ["--partition=gpu"]),
    (Resources(gpus=4), ["--gpus=4"]),
    (Resources(account="lab", qos="short", reservation="course", constraint="intel&ib"),
     ["--account=lab", "--qos=short", "--reservation=course", "--constraint=intel&ib"]),
])
def test_resources_give_one_option_each_and_none_for_slurms_defaults(resources, options):
    assert resources.sbatch_options() == options


# --------------------------------------------------------- parse_job_id --

@pytest.mark.parametrize("out, job_id", [("123\n", "123"), ("123;cluster\n", "123"),
                                         (" 7 ", "7")])
def test_parse_job_id(out, job_id):
    assert parse_job_id(out) == job_id


@pytest.mark.parametrize("out", ["", "\n", "Submitted batch job 12", ";cluster", "12a"])
def test_parse_job_id_refuses_an_answer_without_one(out):
    with pytest.raises(SlurmError, match="^sbatch: no job id"):
        parse_job_id(out)


# ------------------------------------------------------------- JobState --

@pytest.mark.parametrize("words, state", [
    (["PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
      "RESV_DEL_HOLD", "SPECIAL_EXIT"], JobState.PENDING),
    (["RUNNING", "SUSPENDED", "STOPPED", "SIGNALING"], JobState.RUNNING),
    (["COMPLETING", "STAGE_OUT", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
      "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED", ""], JobState.GONE),
])
def test_job_state_of_every_slurm_state(words, state):
    for word in words:
        assert JobState.of(word) is state, word


def test_job_state_of_odd_spellings():
    assert JobState.of("running") is JobState.RUNNING
    assert JobState.of("CANCELLED by 1000") is JobState.GONE  # (scontrol's)
    assert JobState.of("CANCELLED+") is JobState.GONE         # (sacct's)
    # A word this Slurm doesn't know: not seen to end, so not dropped.
    assert JobState.of("SOMETHING_NEW") is JobState.PENDING


def test_job_alive():
    assert Job("1", JobState.PENDING).alive and Job("1", JobState.RUNNING).alive
    assert not Job("1", JobState.GONE).alive


def test_job_environment_drops_the_jobs_own_slurm_variables():
    env = {"PATH": "/bin", "SLURM_JOB_ID": "3", "SBATCH_X": "1", "SRUN_Y": "2",
           "SLURM_CONF": "/etc/slurm.conf"}
    assert job_environment(env) == {"PATH": "/bin", "SLURM_CONF": "/etc/slurm.conf"}


# ------------------------------------------------- the client, faked Slurm --

class FakeSlurm:
    """squeue, scancel and sbatch as one script on a PATH of its own: each
    call appends its argv to calls.log; what it prints (and its status)
    comes from files the test writes."""

    def __init__(self, root: Path):
        self.bin = root / "bin"
        self.bin.mkdir()
        self.root = root
        script = f"""#!/bin/sh
            printf '%s ' "$(basename "$0")" "$@" >> {root}/calls.log; echo >> {root}/calls.log
            name=$(basename "$0")
            [ -f {root}/$name.err ] && {{ cat {root}/$name.err >&2; exit 1; }}
            [ -f {root}/$name.out ] && cat {root}/$name.out
            exit 0
        """
        for name in ("squeue", "scancel", "sbatch", "sacctmgr"):
            (self.bin / name).write_text("\n".join(line.strip() for line in
                                                   script.splitlines()).lstrip())
            (self.bin / name).chmod(0o755)
        self.client = SlurmClient(env={"PATH": f"{self.bin}:/usr/bin:/bin"})

    def answers(self, command: str, out: str = "", err: str | None = None) -> None:
        (self.root / f"{command}.out").write_text(out)
        if err is not None:
            (self.root / f"{command}.err").write_text(err)

    def calls(self) -> list[str]:
        log = self.root / "calls.log"
        return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def fake(tmp_path) -> FakeSlurm:
    return FakeSlurm(tmp_path)


def test_jobs_asks_one_squeue_for_all_of_them(fake):
    fake.answers("squeue", "12|RUNNING|node1|None\n13|PENDING||Resources\n"
                           "15|COMPLETING|node2|None\n")
    jobs = asyncio.run(fake.client.jobs(["12", "13", "14", "15", "12"]))
    assert fake.calls() == ["squeue --noheader --jobs=12,13,14,15 --format=%i|%T|%N|%r|%S|%e "]
    assert jobs == {
        "12": Job("12", JobState.RUNNING, "RUNNING", "node1", ""),
        "13": Job("13", JobState.PENDING, "PENDING", "", "Resources"),
        "14": Job("14", JobState.GONE),  # not listed: ended and forgotten
        "15": Job("15", JobState.GONE, "COMPLETING", "node2", ""),
    }


def test_jobs_of_none_asks_nothing(fake):
    assert asyncio.run(fake.client.jobs([])) == {}
    assert fake.calls() == []


def test_a_forgotten_job_is_gone(fake):
    fake.answers("squeue", err="slurm_load_jobs error: Invalid job id specified\n")
    assert asyncio.run(fake.client.job("9")) == Job("9", JobState.GONE)


def test_a_forgotten_job_among_several_is_asked_about_alone(fake):
    """A Slurm that refuses the whole list for one forgotten id must not
    make the others look ended."""
    fake.answers("squeue", err="slurm_load_jobs error: Invalid job id specified\n")
    jobs = asyncio.run(fake.client.jobs(["1", "2"]))
    assert jobs == {"1": Job("1", JobState.GONE), "2": Job("2", JobState.GONE)}
    assert fake.calls()[1:] == ["squeue --noheader --jobs=1 --format=%i|%T|%N|%r|%S|%e ",
                                "squeue --noheader --jobs=2 --format=%i|%T|%N|%r|%S|%e "]


def test_a_failing_squeue_is_one_line_slurm_error(fake):
    fake.answers("squeue", err="squeue: error: Unable to contact slurm controller\n"
                                "squeue: error: (connect failure)\n")
    with pytest.raises(SlurmError) as failed:
        asyncio.run(fake.client.job("9"))
    assert str(failed.value) == ("squeue: error: Unable to contact slurm controller; "
                                 "error: (connect failure)")


def test_a_missing_command_is_slurm_error(tmp_path):
    client = SlurmClient(env={"PATH": str(tmp_path)})
    with pytest.raises(SlurmError, match="^squeue: No such file or directory$"):
        asyncio.run(client.job("1"))


def test_a_command_past_its_timeout_is_killed_and_slurm_error(tmp_path):
    """A slurmctld that takes connections but doesn't answer holds squeue:
    the caller is not held with it."""
    squeue = tmp_path / "squeue"
    squeue.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/pid\nexec sleep 60\n")
    squeue.chmod(0o755)
    client = SlurmClient(env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    with pytest.raises(SlurmError, match="^squeue: no answer within 0.5 s$"):
        asyncio.run(client.run("squeue", timeout=0.5))
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_submit_passes_the_argv_and_env_and_parses_the_id(fake, tmp_path):
    fake.answers("sbatch", "42;cluster\n")
    argv = sbatch_argv(["true"], job_name="j", output="o", chdir="/")
    assert asyncio.run(fake.client.submit(argv, env={"PATH": f"{fake.bin}:/bin"})) == "42"
    assert fake.calls() == ["sbatch " + " ".join(argv[1:]) + " "]


def test_cancel_variants(fake):
    asyncio.run(fake.client.cancel("5"))
    asyncio.run(fake.client.cancel("5", signal="INT", batch_only=True))
    asyncio.run(fake.client.cancel("5", signal=15))
    asyncio.run(fake.client.cancel_named("chspawner-kernel-x", "alice"))
    assert fake.calls() == ["scancel 5 ", "scancel --batch --signal=INT 5 ",
                            "scancel --signal=15 5 ",
                            "scancel --name=chspawner-kernel-x --user=alice "]


def test_queue_place(fake):
    fake.answers("squeue", "30\n31\n32\n")
    assert asyncio.run(fake.client.queue_place("31", "short")) == (2, 3)
    assert asyncio.run(fake.client.queue_place("99")) is None
    assert fake.calls() == [
        "squeue --noheader --states=PENDING --sort=-p,i --format=%i --partition=short ",
        "squeue --noheader --states=PENDING --sort=-p,i --format=%i "]



def test_associations_are_the_users_accounts_once_each(fake):
    fake.answers("sacctmgr", "lab\nphysics\nlab\n\n")
    assert asyncio.run(fake.client.associations("alice")) == ["lab", "physics"]
    assert fake.calls() == ["sacctmgr --noheader --parsable2 show assoc user=alice "
                            "format=account "]


def test_associations_without_slurmdbd_is_one_line_slurm_error(fake):
    fake.answers("sacctmgr", err="sacctmgr: error: Problem talking to the database: "
                                 "Connection refused\n")
    with pytest.raises(SlurmError, match="^sacctmgr: error: Problem talking to the database"):
        asyncio.run(fake.client.associations("alice"))
