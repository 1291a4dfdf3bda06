"""The spawners' user options without a hub: whatever the admin's
``apply_user_options`` hook does, start()'s ``check_options`` step validates
what will run; a user's mistake is an OptionError (a 400 whose one-line
``jupyterhub_message`` JupyterHub shows) and changes nothing; per-image
modes and groups; the Slurm site options (accounts, QOS, reservation,
constraint, extra arguments, set-up lines) reach the one sbatch builder.

The image store is the one collaborator faked (no images needed), and
Slurm's client where a test asks Slurm for a user's associations."""
from __future__ import annotations

import asyncio
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from chspawner.slurm import SlurmClient
from chspawner.spawners import ChSpawner, SlurmChSpawner
from chspawner.spawners.options import OptionError

pytestmark = pytest.mark.unit

IMAGES = [{"name": "deb", "description": "Debian"},
          {"name": "phys", "groups": ["physics"], "modes": ["kernels"]}]


class FakeStore:
    """Every image present, with a jupyterhub-singleuser."""

    def __init__(self, root: Path):
        self.root = root
        (root / "usr/bin").mkdir(parents=True, exist_ok=True)
        (root / "usr/bin/jupyterhub-singleuser").touch()

    def exists(self, image: str) -> bool:
        return True

    def require(self, image: str) -> Path:
        return self.root

    def runnable(self, image: str) -> Path:  # (no SquashFS file)
        return self.root


def make(tmp_path: Path, kind: type = ChSpawner, groups: tuple[str, ...] = (),
         hook=None, **config) -> ChSpawner:
    spawner = kind(images=IMAGES, **config)
    if hook is not None:
        spawner.apply_user_options = hook
    spawner.user = SimpleNamespace(name="alice",
                                   groups=[SimpleNamespace(name=g) for g in groups])
    store = FakeStore(tmp_path)
    spawner.store_for = lambda image: store
    return spawner


def spawn_checks(spawner: ChSpawner, options: dict) -> None:
    """What the hub does before start(): JupyterHub runs the admin's hook
    on the user's options, then the pre-spawn step checks them."""
    spawner.user_options = options

    async def steps():
        await spawner._run_apply_user_options(spawner.user_options)
        result = spawner.run_pre_spawn_hook()
        if asyncio.iscoroutine(result):
            await result
    asyncio.run(steps())


def refused(spawner: ChSpawner, options: dict) -> str:
    """The one-line message of a refusal; nothing was set."""
    before = dict(getattr(spawner, "request", {}))
    with pytest.raises(OptionError) as e:
        spawn_checks(spawner, options)
    message = e.value.jupyterhub_message
    assert e.value.status_code == 400 and message and "\n" not in message
    assert (spawner.image, spawner.mode) == ("", "")
    assert dict(getattr(spawner, "request", {})) == before
    return message


# ------------------------------------------------ the admin's own hook ---

def test_the_default_hook_does_nothing_and_start_validates(tmp_path):
    spawner = make(tmp_path)
    spawn_checks(spawner, {"image": "deb", "mode": "server"})
    assert (spawner.image, spawner.mode) == ("deb", "server")


@pytest.mark.parametrize("hook", [
    lambda spawner, options: None,
    lambda spawner, options: {},
    lambda spawner, options: setattr(spawner, "mode", "server"),
])
def test_a_hook_that_does_nothing_of_ours_leaves_the_validation_on(tmp_path, hook):
    spawner = make(tmp_path, hook=hook)
    assert "is not offered" in refused(spawner, {"image": "secret"})
    assert "may not contain ';'" in refused(spawner, {"image": "deb;rm"})


@pytest.mark.parametrize("image, words", [
    ("../../etc", "invalid image name '../../etc'"),
    ("secret", "image 'secret' is not offered here"),
    ("phys", "image 'phys' is not offered here"),  # (the physics group's)
])
def test_an_image_set_by_the_admins_hook_is_checked_too(tmp_path, image, words):
    async def hook(spawner, options):  # (hooks may be async)
        spawner.image = image
    spawner = make(tmp_path, hook=hook)
    assert words in refused(spawner, {"image": "deb"})


def test_a_hook_may_change_the_options_it_is_given(tmp_path):
    def hook(spawner, options):
        options["mode"] = "kernels"
    spawner = make(tmp_path, hook=hook)
    spawn_checks(spawner, {"image": "deb", "mode": "server"})
    assert (spawner.image, spawner.mode) == ("deb", "kernels")
    assert spawner.user_options == {"image": "deb", "mode": "kernels"}


def test_options_the_admins_hook_handles_are_accepted_when_named(tmp_path):
    def hook(spawner, options):
        spawner.environment = {"COURSE": options.get("course", "")}
    assert "unknown options: course" in refused(make(tmp_path, hook=hook),
                                                {"image": "deb", "course": "phys101"})
    spawner = make(tmp_path, hook=hook, extra_options=["course"])
    spawn_checks(spawner, {"image": "deb", "course": "phys101"})
    assert spawner.image == "deb" and spawner.environment == {"COURSE": "phys101"}
    assert "may not contain '$'" in refused(spawner, {"image": "deb", "course": "$(id)"})


# --------------------------------------------------- the user's mistakes --

@pytest.mark.parametrize("options, words", [
    ({"image": "deb\nrm -rf ~"}, "image may not contain '\\n'"),
    ({"image": "deb", "mode": "server;id"}, "mode may not contain ';'"),
    ({"image": "deb", "mode": "kernels server"}, "mode may not contain ' '"),
    ({"image": "deb", "mode": "bogus"}, "mode 'bogus' is not offered for image deb"),
    ({"image": "../etc"}, "invalid image name '../etc'"),
    ({"image": 3}, "image must be a string, not a number"),
    ({"image": "deb", "extra": "x"}, "unknown options: extra"),
    ({"image": "deb", "a\nb": "x"}, "unknown options: 'a\\nb'"),
    ({"image": "deb", **{f"k{i}": "x" for i in range(7)}},
     "unknown options: k0, k1, k2, k3, k4 and 2 more"),
    ({"image": "d" * 201}, "image is too long (201 characters; at most 200)"),
])
def test_a_users_mistake_is_one_line_and_changes_nothing(tmp_path, options, words):
    assert words in refused(make(tmp_path), options)


def test_the_errors_are_jupyterhubs_spawn_exceptions():
    """JupyterHub logs a SpawnException in one line, no traceback, and shows
    its message (``jupyterhub_message`` on the spawn page)."""
    from jupyterhub.spawner import SpawnException

    from chspawner.spawners import SpawnFailed
    error = OptionError("partition '50%' is not offered")
    assert isinstance(error, SpawnException) and error.status_code == 400
    assert error.jupyterhub_message == error.message == str(error) == \
        "partition '50%' is not offered"
    assert error.log_message % () == "partition '50%' is not offered"  # (as tornado logs it)
    failed = SpawnFailed("the server exited with status 3 before it answered")
    assert isinstance(failed, SpawnException) and failed.status_code == 500
    assert failed.reason == "start" and failed.jupyterhub_message == str(failed)


# ------------------------------------------- per-image groups and modes ---

def test_an_image_with_groups_is_offered_to_their_members_only(tmp_path):
    outsider, member = make(tmp_path), make(tmp_path, groups=("physics", "x"))
    assert "phys" not in outsider.offered_images()
    assert 'value="phys"' not in outsider.render_options_form()
    spawn_checks(member, {"image": "phys"})
    assert (member.image, member.mode) == ("phys", "kernels")  # its first mode


def test_an_images_modes_limit_the_choice_and_the_form_says_so(tmp_path):
    spawner = make(tmp_path, groups=("physics",))
    assert "mode 'server' is not offered for image phys (offered: kernels)" in \
        refused(spawner, {"image": "phys", "mode": "server"})
    text = spawner.render_options_form()
    assert '<option value="phys" data-modes="kernels">phys (kernels only)</option>' in text
    assert '<option value="deb">deb — Debian</option>' in text


@pytest.mark.parametrize("entry, words", [
    ({"name": "x", "modes": ["gui"]}, "unknown mode(s) gui"),
    ({"name": "x", "modes": "kernels"}, "'modes' must be list, not str"),
    ({"name": "x", "groups": [3]}, "'groups' must be a list of strings"),
])
def test_the_image_entrys_modes_and_groups_are_checked(entry, words):
    from traitlets import TraitError
    with pytest.raises(TraitError, match=None) as e:
        ChSpawner(images=[entry])
    assert words in str(e.value)


# ------------------------------------------------- Slurm: site options ---

SITE = dict(partitions=["short", "long"], accounts=["lab", "physics"], qos=["normal"],
            reservation="course", constraint="intel&ib",
            extra_sbatch_args=["--exclusive"], cmd=["/venv/bin/jupyterhub-singleuser"],
            job_setup=["module load cuda/12", "export SITE='a b'"], port=8123)


@pytest.mark.parametrize("options, words", [
    ({"image": "deb", "account": "other"}, "account 'other' is not offered (offered: lab, "
                                           "physics)"),
    ({"image": "deb", "qos": "high"}, "qos 'high' is not offered (offered: normal)"),
    ({"image": "deb", "partition": "gpu"}, "partition 'gpu' is not offered"),
    ({"image": "deb", "account": "lab;id"}, "account may not contain ';'"),
    ({"image": "deb", "qos": "normal\n--wrap=id"}, "qos may not contain '\\n'"),
    ({"image": "deb", "partition": "short`id`"}, "partition may not contain '`'"),
    ({"image": "deb", "account": "lab", "cpus": 99}, "cpus must be a whole number"),
])
def test_slurm_choices_not_offered_are_refused_and_change_nothing(tmp_path, options, words):
    spawner = make(tmp_path, SlurmChSpawner, **SITE)
    spawner.request = {"partition": "long", "account": "physics"}
    assert words in refused(spawner, options)


def test_slurm_job_gets_the_site_options_through_the_one_builder(tmp_path):
    spawner = make(tmp_path, SlurmChSpawner, **SITE)
    spawner.user = SimpleNamespace(name="root", groups=[])  # (a home dir to chdir to)
    spawn_checks(spawner, {"image": "deb", "mode": "server", "account": "physics"})
    assert spawner.request["account"] == "physics" and spawner.request["qos"] == "normal"
    argv = spawner.job_argv()
    options = argv[:-1]
    for option in ("--partition=short", "--account=physics", "--qos=normal",
                   "--reservation=course", "--constraint=intel&ib"):
        assert option in options
    assert options.index("--exclusive") > options.index("--qos=normal")  # (after: overrides)
    script = argv[-1].removeprefix("--wrap=").split("\n")
    assert script[:2] == ["module load cuda/12", "export SITE='a b'"]
    assert script[2:4] == spawner.bind_lines()  # (ours, after the admin's)
    assert len(script) == 5 and script[4].endswith(" & exec " + shlex.join(spawner.get_command()))


def test_slurm_form_offers_account_and_qos_when_there_is_a_choice(tmp_path):
    text = make(tmp_path, SlurmChSpawner, **SITE).render_options_form()
    assert ('<select class="form-control" name="account" id="account">'
            '<option value="lab">lab</option><option value="physics">physics</option>') in text
    assert 'name="qos"' not in text  # (one QOS: nothing to choose)
    assert 'name="partition"' in text


class FakeSacctmgr:
    """sacctmgr on a PATH of its own, printing the given accounts."""

    def __init__(self, root: Path, accounts: list[str]):
        (root / "bin").mkdir()
        script = root / "bin/sacctmgr"
        script.write_text("#!/bin/sh\necho \"$@\" >> %s/args\nprintf '%s'\n"
                          % (root, "".join(a + "\\n" for a in accounts)))
        script.chmod(0o755)
        self.client = SlurmClient(env={"PATH": f"{root}/bin:/usr/bin:/bin"})
        self.args = root / "args"

    def calls(self) -> list[list[str]]:
        """Each call's arguments, in order."""
        return [line.split() for line in self.args.read_text().splitlines()] \
            if self.args.exists() else []


@pytest.mark.parametrize("accounts, mine, offered", [
    ([], ["lab", "chem"], ["lab", "chem"]),
    (["chem", "bio"], ["lab", "chem"], ["chem"]),
])
def test_accounts_from_the_users_slurm_associations(tmp_path, accounts, mine, offered):
    fake = FakeSacctmgr(tmp_path, mine)
    spawner = make(tmp_path, SlurmChSpawner, accounts=accounts, accounts_from_slurm=True)
    spawner.slurm = lambda: fake.client
    text = asyncio.run(spawner.options_form(spawner))
    assert fake.calls() == [["--noheader", "--parsable2", "show", "assoc", "user=alice",
                             "format=account"]]
    assert (f'<option value="{offered[0]}">' in text) == (len(offered) > 1)
    spawn_checks(spawner, {"image": "deb"})
    assert spawner.request["account"] == offered[0]
    assert "account 'bio' is not offered" in refused(spawner, {"image": "deb",
                                                               "account": "bio"})


def test_a_user_without_slurm_accounts_is_told_why(tmp_path):
    fake = FakeSacctmgr(tmp_path, [])
    spawner = make(tmp_path, SlurmChSpawner, accounts_from_slurm=True)
    spawner.slurm = lambda: fake.client
    assert "you have no Slurm account this hub may use" in refused(spawner, {"image": "deb"})


def test_slurm_is_asked_for_the_accounts_once_a_spawn(tmp_path):
    """The pre-spawn step asks sacctmgr; start()'s check uses its answer
    (JupyterHub runs the two in a row); the next spawn asks again."""
    fake = FakeSacctmgr(tmp_path, ["lab", "chem"])
    spawner = make(tmp_path, SlurmChSpawner, accounts_from_slurm=True)
    spawner.slurm = lambda: fake.client
    for spawns in (1, 2):
        spawn_checks(spawner, {"image": "deb", "account": "chem"})
        asyncio.run(spawner.ask_once())  # (start()'s)
        spawner.check_options()
        assert len(fake.calls()) == spawns and spawner.request["account"] == "chem"
    # start() without the pre-spawn step (or after it refused) asks itself.
    refused(spawner, {"image": "deb", "account": "bio"})
    asyncio.run(spawner.ask_once())
    assert len(fake.calls()) == 4


def test_the_form_makes_numbers_of_number_fields_only(tmp_path):
    """An account named by digits stays text (it was made a number, then
    refused as one); 5000 digits stay text, for the field's bounds to refuse
    (int() refuses over 4300 digits with a Python message)."""
    spawner = make(tmp_path, SlurmChSpawner, accounts=["1234"], max_cpus=4)
    options = spawner.options_from_form({"image": ["deb"], "account": ["1234"],
                                         "cpus": ["9" * 5000], "hours": ["2"]})
    assert options == {"image": "deb", "account": "1234", "cpus": "9" * 5000, "hours": 2}
    assert "cpus must be a whole number from 1 to 4" in refused(spawner, options)
    spawn_checks(spawner, {**options, "cpus": 2})
    assert spawner.request["account"] == "1234"


def test_a_site_option_with_a_newline_fails_the_spawn_in_one_line(tmp_path):
    """An admin's hook that puts text into a site option (here a newline,
    which sbatch would read as a second line): refused before anything is
    made or submitted, in one line, not a traceback."""
    from chspawner.spawners import SpawnFailed

    def hook(spawner, options):
        spawner.reservation = "course\n#SBATCH --qos=high"
    spawner = make(tmp_path, SlurmChSpawner, hook=hook, **SITE)
    spawner.user = SimpleNamespace(name="root", groups=[])  # (a home dir)
    spawner.slurm = lambda: pytest.fail("nothing may be submitted")
    spawn_checks(spawner, {"image": "deb"})
    with pytest.raises(SpawnFailed) as failed:
        asyncio.run(spawner.launch())
    assert str(failed.value) == ("can't submit the server's job: sbatch option value "
                                 "'course\\n#SBATCH --qos=high' has a control character")
    assert spawner.job_id == ""


def test_the_kernels_jobs_get_the_site_options_too(tmp_path):
    """Kernels mode with a job per kernel: each kernel's job asks for the
    user's account and QOS and the admin's reservation and constraint (not
    extra_sbatch_args: the kernels' are kernel_sbatch_args)."""
    import ast
    spawner = make(tmp_path, SlurmChSpawner, kernel_sbatch_args=["--comment=k"], **SITE)
    spawner.user = SimpleNamespace(name="root", groups=[])
    spawn_checks(spawner, {"image": "deb", "mode": "kernels", "account": "physics"})
    [config] = [a.partition("=")[2] for a in spawner.get_args()
                if a.startswith("--ContainerKernelSpecManager.provisioner_config=")]
    args = ast.literal_eval(config)["sbatch_args"]
    for option in ("--account=physics", "--qos=normal", "--reservation=course",
                   "--constraint=intel&ib", "--partition=short"):
        assert option in args
    assert args[-1] == "--comment=k" and "--exclusive" not in args


# ------------------------------------------------ the job on its node ----

def server_url_in_job(spawner: SlurmChSpawner, node: str) -> str:
    """JUPYTERHUB_SERVICE_URL as the server's job script leaves it on ``node``."""
    import subprocess
    script = "\n".join([*spawner.bind_lines(), 'printf %s "$JUPYTERHUB_SERVICE_URL"'])
    return subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, check=True, timeout=30,
        env={"PATH": "/usr/bin:/bin", "SLURMD_NODENAME": node,
             "JUPYTERHUB_SERVICE_URL": "http://0.0.0.0:8123/user/a%20b/"}).stdout


def test_the_server_job_listens_on_its_nodes_own_address(tmp_path):
    """The address the node's name resolves to on the node; a name that
    resolves to loopback or to nothing leaves the hub's ip (all addresses)."""
    spawner = make(tmp_path, SlurmChSpawner)
    assert server_url_in_job(spawner, "192.0.2.7") == "http://192.0.2.7:8123/user/a%20b/"
    assert server_url_in_job(spawner, "localhost") == "http://0.0.0.0:8123/user/a%20b/"
    assert server_url_in_job(spawner, "") == "http://0.0.0.0:8123/user/a%20b/"
    assert make(tmp_path, SlurmChSpawner, bind_node_address=False).bind_lines() == []
    assert make(tmp_path, SlurmChSpawner, ip="::").bind_lines() == []  # (IPv6: as set)


def test_a_lost_servers_node_is_left_out_of_its_next_job(tmp_path):
    """A server that does not answer when it is stopped, while Slurm still
    runs its job, was lost with its node: it is not asked to shut its
    kernels down (only its job is cancelled), and the user's next server
    job excludes the node for ``avoid_lost_node`` s. A job that ended
    (cancelled, its server exited) says nothing of its node."""
    import socket

    from chspawner.slurm import Job, JobState

    class Slurm:
        calls: list = []
        state = JobState.RUNNING  # (Slurm has yet to notice the node is gone)

        async def job(self, job_id, max_age=0.0):  # (the hub's job watch's)
            return Job(job_id, self.state)

        async def cancel(self, job_id, **kw):
            self.calls.append((job_id, kw))

    spawner = make(tmp_path, SlurmChSpawner, partitions=["short"])
    spawner.user = SimpleNamespace(name="root", groups=[])  # (a home dir to chdir to)
    slurm = Slurm()
    spawner.slurm = spawner.job_watch = lambda: slurm
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        spawner.job_id, spawner.node, spawner.port = "5", "127.0.0.1", closed.getsockname()[1]
    asyncio.run(spawner.stop())
    assert slurm.calls == [("5", {})]  # no SIGINT first: nothing there to ask
    spawn_checks(spawner, {"image": "deb", "mode": "server"})
    assert "--exclude=127.0.0.1" in spawner.job_argv()
    spawner.avoid_lost_node = 0
    assert not any(a.startswith("--exclude") for a in spawner.job_argv())
    spawner.avoid_lost_node, spawner._lost_node, slurm.state = 600, None, JobState.GONE
    spawner.job_id, spawner.node = "6", "127.0.0.1"
    asyncio.run(spawner.stop())
    assert not any(a.startswith("--exclude") for a in spawner.job_argv()), \
        (spawner._lost_node, spawner.port, [a for a in spawner.job_argv() if "exclu" in a])


# ------------------------------------------ past the time limit (move) ---

@pytest.mark.parametrize("setting, options, moves", [
    ("never", {"image": "deb"}, False),
    ("always", {"image": "deb"}, True),
    ("offer", {"image": "deb"}, False),
    ("offer", {"image": "deb", "keep_session": True}, True),
    ("offer", {"image": "deb", "keep_session": False}, False),
])
def test_whether_a_session_moves_at_its_time_limit(tmp_path, setting, options, moves):
    spawner = make(tmp_path, SlurmChSpawner, walltime_move=setting)
    spawn_checks(spawner, options)
    assert spawner.moves_at_walltime() is moves


def test_an_images_entry_moves_its_sessions_whatever_the_setting(tmp_path):
    spawner = make(tmp_path, SlurmChSpawner)
    spawner.images = [*IMAGES, {"name": "long", "move_at_walltime": True}]
    spawn_checks(spawner, {"image": "long"})
    assert spawner.moves_at_walltime()
    with pytest.raises(Exception, match="'move_at_walltime' must be bool"):
        spawner.images = [{"name": "long", "move_at_walltime": "yes"}]


@pytest.mark.parametrize("setting, options, words", [
    ("never", {"image": "deb", "keep_session": True},
     "keep_session is not offered here: this hub does not move sessions past their "
     "time limit"),
    ("always", {"image": "deb", "keep_session": True},
     "keep_session is not offered here: this hub moves every session"),
    ("offer", {"image": "deb", "keep_session": "yes"}, "keep_session must be true or false"),
    ("offer", {"image": "deb", "keep_session": 1}, "keep_session must be true or false"),
])
def test_keep_session_mistakes_are_refused(tmp_path, setting, options, words):
    assert words in refused(make(tmp_path, SlurmChSpawner, walltime_move=setting), options)


def test_the_form_offers_keep_session_and_says_why_the_last_job_ended(tmp_path):
    spawner = make(tmp_path, SlurmChSpawner, walltime_move="offer")
    spawner.last_end = "Your last server's job 7 ended by itself at 14:05: it <reached>."
    text = spawner.render_options_form()
    assert 'name="keep_session" id="keep_session" value="on"' in text
    assert "it &lt;reached&gt;." in text  # (escaped)
    assert spawner.options_from_form({"image": ["deb"], "keep_session": ["on"]}) == \
        {"image": "deb", "keep_session": True}
    assert "keep_session" not in make(tmp_path, SlurmChSpawner).render_options_form()


def test_the_server_is_told_what_happens_at_its_time_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(ChSpawner, "get_env", lambda self: {})  # (JupyterHub's: a hub's)
    spawner = make(tmp_path, SlurmChSpawner, walltime_move="offer",
                   walltime_warnings=[20, 2.5])
    spawn_checks(spawner, {"image": "deb", "keep_session": True})
    env = spawner.get_env()
    assert env["CHSPAWNER_AT_WALLTIME"] == "move"
    assert env["CHSPAWNER_WALLTIME_WARNINGS"] == "20,2.5"
    assert "CHSPAWNER_PREVIOUS_END" not in env
    spawner.keep_session, spawner.last_end = False, "Your last server's job 7 ended."
    env = spawner.get_env()
    assert env["CHSPAWNER_AT_WALLTIME"] == "stop"
    assert env["CHSPAWNER_PREVIOUS_END"] == "Your last server's job 7 ended."


def test_the_successor_and_why_the_last_job_ended_are_kept_in_the_state(tmp_path):
    spawner = make(tmp_path, SlurmChSpawner)
    spawner.load_state({"job_id": "5", "node": "n1", "port": 1234, "spawn_nonce": "x",
                        "successor_job_id": "6", "successor_port": 4321,
                        "successor_nonce": "y", "keep_session": True})
    assert (spawner.successor_job_id, spawner.successor_port) == ("6", 4321)
    state = spawner.get_state()
    assert state["successor_job_id"] == "6" and state["keep_session"] is True
    spawner.last_end = "why"
    spawner.clear_state()
    assert (spawner.job_id, spawner.successor_job_id) == ("", "")
    assert spawner.get_state()["last_end"] == "why"  # (about the server that ended)
