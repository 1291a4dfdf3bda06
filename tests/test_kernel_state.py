"""A kernel's session saved and restored in a new kernel process (issue 19's
kernel side: kernels/ipykernel/session/chspawner_session.py).

The unit tests read the recorder's planning on its own; the others run
IPython in the test image (Debian's ipykernel, numpy and pandas; no
cloudpickle, which chspawner brings), as the unprivileged user: one
container records a session and saves it, a second, new one restores it.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from tests.harness.env import CHSPAWNER, VENV_BIN
from tests.harness.users import as_user

SESSION = Path(__file__).resolve().parent.parent / "kernels" / "ipykernel" / "session"
sys.path.insert(0, str(SESSION))
import chspawner_session as cs  # noqa: E402

# ------------------------------------------------------------ planning --


def cell(n, reads=(), writes=()):
    return cs.CellRecord(n, f"cell {n}", set(reads), set(writes), 0.1, True)


@pytest.mark.unit
def test_plan_reruns_the_cells_that_made_what_cant_be_saved():
    cells = [cell(1, writes={"big"}), cell(2, reads={"big"}, writes={"gen"})]
    rerun, again, lost = cs.plan(cells, {"big", "gen"}, {"gen"})
    assert rerun == [1] and again == {"gen"} and lost == {}


@pytest.mark.unit
def test_plan_remakes_what_a_rerun_cell_read_if_a_later_cell_changed_it():
    # gen read x as cell 2 saw it; cell 3 changed x: x must be made again too.
    cells = [cell(1, writes={"x"}), cell(2, reads={"x"}, writes={"gen"}),
             cell(3, reads={"x"}, writes={"x"})]
    rerun, again, _ = cs.plan(cells, {"x", "gen"}, {"gen"})
    assert rerun == [0, 1, 2] and again == {"x", "gen"}


@pytest.mark.unit
def test_plan_reports_what_no_recorded_cell_made():
    rerun, again, lost = cs.plan([], {"f"}, {"f"}, unrecorded={"f"})
    assert rerun == [] and "before chspawner began recording" in lost["f"]


@pytest.mark.unit
def test_cell_names_tell_reads_from_changes():
    names = cs.CellNames()
    names.visit(cs.ast.parse("a.append(1)\nb[0] = 2\nm = c.mean()\ng = (x for x in d.items())"))
    assert names.changed == {"a", "b"}
    assert {"a", "b", "c", "d"} <= names.loaded


@pytest.mark.unit
def test_a_function_that_changes_nothing_is_told_from_one_that_does():
    def verdict(code):
        return cs.changes_nothing(cs.ast.parse(code).body[0], cs.PURE_BUILTINS)
    assert verdict("def scale(v, by=2):\n    total = v * by\n    total += 1\n    return total")
    assert verdict("def first(xs):\n    out = list(xs)\n    out.append(1)\n    return sorted(out)")
    assert not verdict("def push(xs):\n    xs.append(1)")
    assert not verdict("def put(d):\n    d['k'] = 1")
    assert not verdict("def grow():\n    global n\n    n = 1")
    assert not verdict("def hand(xs):\n    other(xs)")  # other may change it


@pytest.mark.unit
def test_kernels_are_moved_when_idle_near_their_jobs_limit():
    """The server's choice of kernels to move before their limit: idle,
    recording, within move_lead, each job once (a fake kernel manager)."""
    from types import SimpleNamespace

    from chspawner.persist.kernel_state import KernelSessions, KernelState
    from chspawner.slurm import Job, JobState

    def kernel(end_time, state="idle", records=True, job_id="1"):
        settings = SimpleNamespace(session_state=records)
        job = Job(job_id, JobState.RUNNING, end_time=end_time)
        return SimpleNamespace(execution_state=state, provisioner=SimpleNamespace(
            settings=settings, last_job=job))

    now = 1_000_000.0
    kernels = {"near": kernel(now + 300, job_id="1"), "far": kernel(now + 3600, job_id="2"),
               "busy": kernel(now + 300, state="busy", job_id="3"),
               "plain": kernel(now + 300, records=False, job_id="4"),
               "no-limit": kernel(None, job_id="5")}
    manager = SimpleNamespace(list_kernel_ids=lambda: list(kernels),
                              get_kernel=kernels.__getitem__,
                              __contains__=lambda self, k: k in kernels)
    sessions = KernelSessions(manager, KernelState(move_lead=600))
    assert [k for k, _ in sessions.due_for_move(now)] == ["near"]
    sessions._moved_jobs.add("1")  # (as check_limits notes it)
    assert sessions.due_for_move(now) == []
    kernels["busy"].execution_state = "idle"  # its cell ended
    assert [k for k, _ in sessions.due_for_move(now)] == ["busy"]


@pytest.mark.unit
def test_idle_kernels_are_saved_every_interval_once_they_ran_something(tmp_path):
    """autosave_interval: an idle recording kernel without a snapshot, or
    with one older than the interval, that ran something since (its
    last_activity moved past what it was after the save)."""
    import time as clock
    from types import SimpleNamespace

    from chspawner.persist.kernel_state import KernelSessions, KernelState

    def kernel(state="idle", records=True):
        return SimpleNamespace(execution_state=state, last_activity=1, provisioner=SimpleNamespace(
            settings=SimpleNamespace(session_state=records)))

    kernels = {"new": kernel(), "busy": kernel("busy"), "plain": kernel(records=False),
               "fresh": kernel(), "old": kernel()}
    for key, created in (("fresh", clock.time() - 60), ("old", clock.time() - 7200)):
        (tmp_path / key).mkdir()
        (tmp_path / key / "manifest.json").write_text(json.dumps({"created": created}))
    manager = SimpleNamespace(list_kernel_ids=lambda: list(kernels),
                              get_kernel=kernels.__getitem__)
    off = KernelSessions(manager, KernelState(), root=tmp_path)
    assert off.due_for_save(clock.time()) == []  # (0: never)
    sessions = KernelSessions(manager, KernelState(autosave_interval=1800), root=tmp_path)
    now = clock.time()
    assert sessions.due_for_save(now) == ["old"]  # ("new" first seen now)
    assert sessions.due_for_save(now + 1800) == ["new", "old"]
    sessions._saved_activity["old"] = 1  # as a save leaves it: nothing ran since
    assert sessions.due_for_save(now + 1800) == ["new"]
    kernels["old"].last_activity = 2  # a cell ran
    assert sessions.due_for_save(now + 1800) == ["new", "old"]


# --------------------------------------------------- in the test image --

SAVE = '''
import json, os, sys
sys.path.append("/mnt")
from IPython.core.interactiveshell import InteractiveShell
import chspawner_session as cs
ip = InteractiveShell.instance()
cs.load_ipython_extension(ip)
for code in json.load(open("/srv/cells.json")):
    assert ip.run_cell(code).success, code
ip.run_cell("import random as _r, numpy as _np; _s = _r.getstate(); _n = _np.random.get_state(); "
            "expected = (_r.random(), _np.random.rand()); _r.setstate(_s); _np.random.set_state(_n)")
report = json.loads(cs.snapshot("k1", int(sys.argv[1])))
ns = ip.user_ns
report["expected"] = {"random": ns["expected"], "arr": ns["arr"].tolist()[:3],
                      "arr_sum": float(ns["arr"].sum()), "df": ns["df"].to_dict(),
                      "twice": ns["p"].twice()}
print(json.dumps(report))
'''

RESTORE = '''
import json, sys
sys.path.append("/mnt")
from IPython.core.interactiveshell import InteractiveShell
import chspawner_session as cs
ip = InteractiveShell.instance()
cs.load_ipython_extension(ip)
report = json.loads(cs.restore("k1"))
if report["ok"]:
    assert ip.run_cell(sys.argv[1]).success
    report["got"] = ip.user_ns.get("got")
print(json.dumps(report))
'''

CELLS = [
    "import numpy as np, pandas as pd, random",
    "random.seed(7); np.random.seed(5); arr = np.arange(200000, dtype=float)",
    "df = pd.DataFrame({'a': range(4), 'b': list('wxyz')})",
    "def double(x):\n    return 2 * x + k",
    "k = 1",
    "class P:\n    def __init__(self, v):\n        self.v = v\n"
    "    def twice(self):\n        return double(self.v)",
    "p = P(3); ps = [p, P(4)]",
    "gen = (i * i for i in range(10)); first = next(gen)",
    "fh = open('/srv/data.txt'); line = fh.readline()",
    "arr += 1",
]

#: A cell run after the restore, using every kind of value.
USE = ("import random; got = {'random': [random.random(), float(np.random.rand())], "
       "'arr': arr.tolist()[:3], 'arr_sum': float(arr.sum()), 'df': df.to_dict(), "
       "'twice': p.twice(), 'instance': isinstance(p, P) and ps[0] is p, "
       "'gen': next(gen), 'line': line, 'fh': fh.readline()}")


@pytest.fixture
def session_dir(user, user_dir) -> Path:
    """The recorder and a cloudpickle, where the container sees them
    (/mnt), as the provisioner stages them; the session's files in /srv."""
    import cloudpickle
    staged = user_dir / "session"
    shutil.copytree(SESSION, staged)
    shutil.copytree(Path(cloudpickle.__file__).parent, staged / "cloudpickle")
    (user_dir / "work").mkdir()
    (user_dir / "work" / "cells.json").write_text(json.dumps(CELLS))
    (user_dir / "work" / "save.py").write_text(textwrap.dedent(SAVE))
    (user_dir / "work" / "restore.py").write_text(textwrap.dedent(RESTORE))
    (user_dir / "work" / "data.txt").write_text("first line\nsecond line\n")
    for path in [user_dir, *user_dir.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
    return user_dir


def run_in_image(builtin, bookworm, where: Path, script: str, arg: str) -> dict:
    out = builtin.ok("-b", f"{where}/session:/mnt", "-b", f"{where}/work:/srv",
                     "--set-env=CHSPAWNER_SNAPSHOTS=/srv/snapshots",
                     "--set-env=IPYTHONDIR=/srv/.ipython", str(bookworm), "--",
                     "python3", f"/srv/{script}", arg, timeout=120)
    return json.loads(out.strip().splitlines()[-1])


def test_a_session_moves_to_a_new_kernel_process(builtin, bookworm, session_dir):
    saved = run_in_image(builtin, bookworm, session_dir, "save.py", str(10**9))
    assert saved["ok"], saved
    assert {"arr", "df", "p", "ps", "P", "double", "k", "np", "pd"} <= set(saved["saved"])
    assert {"gen", "fh", "first", "line"} <= set(saved["rebuilt"])  # not picklable
    assert "will be rebuilt by re-running cells [8], [9]" in saved["message"], saved
    snapshot = session_dir / "work" / "snapshots" / "k1"
    assert snapshot.stat().st_mode & 0o777 == 0o700
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in snapshot.iterdir())

    restored = run_in_image(builtin, bookworm, session_dir, "restore.py", USE)
    assert restored["ok"], restored
    got, expected = restored["got"], saved["expected"]
    assert got["random"] == expected["random"]  # random's and numpy's global states
    assert got["arr"] == expected["arr"] and got["arr_sum"] == expected["arr_sum"]
    assert got["df"] == expected["df"]
    assert got["twice"] == expected["twice"] and got["instance"]
    assert got["gen"] == 1  # rebuilt, and where it stood (first took 0)
    assert got["line"] == "first line\n" and got["fh"] == "second line\n"
    assert restored["rerun_cells"] == [8, 9] and not restored["lost"]
    assert "Session restored from the snapshot of" in restored["message"]


def test_a_value_over_the_size_limit_is_rebuilt_instead(builtin, bookworm, session_dir):
    saved = run_in_image(builtin, bookworm, session_dir, "save.py", str(100_000))
    assert saved["ok"], saved
    # The array doesn't fit: its cells ([2], [10]) make it again instead.
    assert "arr" not in saved["saved"] and saved["bytes"] < 100_000
    assert "arr" in saved["rebuilt"] and 2 in saved["rerun_cells"] and not saved["lost"]


def test_a_snapshot_others_could_write_is_never_loaded(builtin, bookworm, session_dir):
    assert run_in_image(builtin, bookworm, session_dir, "save.py", str(10**9))["ok"]
    snapshot = session_dir / "work" / "snapshots" / "k1"
    os.chmod(snapshot / "manifest.json", 0o666)
    refused = run_in_image(builtin, bookworm, session_dir, "restore.py", "got = 1")
    assert not refused["ok"] and "not loaded" in refused["message"], refused
    os.chmod(snapshot / "manifest.json", 0o600)
    os.chmod(snapshot, 0o777)
    refused = run_in_image(builtin, bookworm, session_dir, "restore.py", "got = 1")
    assert not refused["ok"] and "only they can write" in refused["message"], refused
    # Another user's snapshot (here root's), readable by all: never loaded
    # into this user's kernel.
    os.chmod(snapshot, 0o755)
    for path in [snapshot, *snapshot.iterdir()]:
        os.chown(path, 0, 0)
        if path != snapshot:
            os.chmod(path, 0o644)
    refused = run_in_image(builtin, bookworm, session_dir, "restore.py", "got = 1")
    assert not refused["ok"] and "this user's that only they can write" in \
        refused["message"], refused


# ------------------------------------- through the provisioner, a real kernel --

DRIVER = '''
import ast, json, sys
from jupyter_client.manager import KernelManager
km = KernelManager(kernel_name=sys.argv[1])
km.start_kernel()
kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=60)

def run(code):
    out = []
    reply = kc.execute_interactive(code, timeout=60,
        output_hook=lambda m: out.append(m["content"].get("text", "")))
    return reply["content"]["status"], "".join(out)

def call(expression):
    """What the server does: a silent execution, its answer as a user expression."""
    reply = kc.execute_interactive("", silent=True, timeout=60,
                                   user_expressions={"r": expression})
    return json.loads(ast.literal_eval(reply["content"]["user_expressions"]["r"]["data"]["text/plain"]))

report = {}
for code in json.loads(sys.argv[2]):
    assert run(code)[0] == "ok", code
report["snapshot"] = call("__import__('chspawner_session').snapshot('k1')")
pid = run("import os; print(os.getpid())")[1]
km.restart_kernel(now=True)
kc.wait_for_ready(timeout=60)
report["new_process"] = run("import os; print(os.getpid())")[1] != pid
report["restore"] = call("__import__('chspawner_session').restore('k1')")
report["use"] = run(sys.argv[3])
kc.stop_channels()
km.shutdown_kernel(now=True)
print(json.dumps(report))
'''


def test_a_provisioned_kernel_records_and_its_restart_restores(user, user_dir, kernel_store):
    """The provisioner's ``session_state``: the image's own ipykernel (no
    cloudpickle in the image), the recorder loaded, snapshots in the
    user's home; saved, the kernel restarted as a new process, restored."""
    prefix = user_dir / "prefix"
    as_user(user.pw_name, str(CHSPAWNER), "kernel", "install", "-s", kernel_store,
            "--prefix", str(prefix), "--name", "rec", "deb")
    spec_file = prefix / "share/jupyter/kernels/rec/kernel.json"
    spec = json.loads(spec_file.read_text())
    spec["metadata"]["kernel_provisioner"]["config"]["session_state"] = True
    spec_file.write_text(json.dumps(spec))
    (user_dir / "driver.py").write_text(DRIVER)
    os.chmod(user_dir / "driver.py", 0o644)
    cells = ["import numpy as np", "a = np.ones(1000) * 3", "g = (x for x in range(3))"]
    use = "print(float(a.sum()), next(g))"
    result = as_user(user.pw_name, "env", f"TMPDIR={user_dir}",
                     f"JUPYTER_PATH={prefix}/share/jupyter", str(VENV_BIN / "python"),
                     str(user_dir / "driver.py"), "rec", json.dumps(cells), use,
                     check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["snapshot"]["ok"] and report["snapshot"]["rebuilt"] == ["g"], report
    assert report["new_process"]
    assert report["restore"]["ok"] and report["restore"]["rerun_cells"] == [3], report
    assert report["use"] == ["ok", "3000.0 0\n"]
    home = Path(user.pw_dir) / ".local/share/chspawner/snapshots"
    assert (home / "k1" / "manifest.json").stat().st_uid == user.pw_uid
    shutil.rmtree(home / "k1")


# ------------------------------- through a Jupyter server's REST call --

async def _save_restart_restore(s) -> dict:
    import aiohttp
    from tests.harness.kernel_client import execute, kernels_url, start_kernel, warm_up
    report = {}
    async with aiohttp.ClientSession(headers=s.headers) as http:
        kernel = await start_kernel(http, s, "chspawner-deb--python3")
        ws = await http.ws_connect(f"{kernels_url(s)}/{kernel}/channels".replace("http", "ws", 1))
        await warm_up(ws)
        for code in ["import numpy as np", "a = np.arange(10) * 2",
                     "g = (x for x in 'abc'); next(g)"]:
            assert (await execute(ws, code))[0] == "ok", code
        api = f"{s.base}/chspawner/api"
        async with http.post(f"{api}/kernels/{kernel}/snapshot") as r:
            report["snapshot"] = (r.status, await r.json())
        async with http.post(f"{kernels_url(s)}/{kernel}/restart") as r:
            assert r.status == 200, await r.text()
        await ws.close()
        ws = await http.ws_connect(f"{kernels_url(s)}/{kernel}/channels".replace("http", "ws", 1))
        await warm_up(ws)
        report["empty"] = await execute(ws, "print('a' in globals())")
        async with http.post(f"{api}/kernels/{kernel}/restore", json={}) as r:
            report["restore"] = (r.status, await r.json())
        report["use"] = await execute(ws, "print(int(a.sum()), next(g))")
        async with http.get(f"{api}/snapshots") as r:
            report["list"] = (await r.json())["snapshots"]
        async with http.post(f"{api}/kernels/{kernel}/restore", json={"from": "../x"}) as r:
            report["bad_key"] = r.status
        # A move: here (no Slurm) a restart in place, the session with it.
        async with http.post(f"{api}/kernels/{kernel}/move") as r:
            report["move"] = (r.status, await r.json())
        await ws.close()
        ws = await http.ws_connect(f"{kernels_url(s)}/{kernel}/channels".replace("http", "ws", 1))
        await warm_up(ws)
        report["moved_use"] = await execute(ws, "print(int(a.sum()), next(g))")
        async with http.get(f"{s.base}/chspawner/api/session") as r:
            report["notices"] = [n["text"] for n in (await r.json())["notices"]]
        await ws.close()
    return report


def test_the_rest_call_saves_and_restores_a_servers_kernel(user, user_dir, kernel_store):
    """The server extension (chspawner.persist.kernel_state) with the
    persistent kernel manager: save, restart the kernel (a new process,
    its variables gone), restore through the REST call."""
    import asyncio
    from tests.harness.servers import Servers
    conf = user_dir / "conf.py"
    conf.write_text("c.ContainerKernelSpecManager.provisioner_config = "
                    "{'session_state': True}\n")
    os.chmod(conf, 0o644)
    s = Servers(user, user_dir, kernel_store, [
        "--ServerApp.jpserver_extensions=chspawner.persist.kernel_state=True",
        "--ServerApp.jpserver_extensions=chspawner.persist.session_status=True",
        f"--config={conf}"])
    try:
        s.start()
        report = asyncio.run(_save_restart_restore(s))
    finally:
        s.close()
    status, saved = report["snapshot"]
    assert status == 200 and saved["ok"] and saved["rebuilt"] == ["g"], (report, s.log()[-3000:])
    assert report["empty"][:2] == ("ok", "False\n")
    status, restored = report["restore"]
    # (cell 1 was the warm-up's; cell 4 made the generator)
    assert status == 200 and restored["ok"] and restored["rerun_cells"] == [4], report
    assert report["use"][:2] == ("ok", "90 b\n")
    assert report["list"][0]["key"] == saved["key"] and report["list"][0]["rerun"] == 1
    assert report["bad_key"] == 400
    status, moved = report["move"]
    assert status == 200 and moved["ok"] and moved["action"] == "move", report
    # (the generator's cells re-run: its place as at the move)
    assert report["moved_use"][:2] == ("ok", "90 c\n"), report
    # JupyterLab is told of each restore, once, in a sentence.
    assert report["notices"] and all(n.startswith("Kernel session restored from a snapshot")
                                     for n in report["notices"]), report["notices"]
    shutil.rmtree(Path(user.pw_dir) / ".local/share/chspawner/snapshots" / saved["key"])


async def _work_then_wait_for_autosave(s, snapshots: Path) -> tuple[dict, str]:
    import aiohttp
    from tests.harness.kernel_client import execute, kernels_url, start_kernel, warm_up
    from tests.harness.wait import until
    async with aiohttp.ClientSession(headers=s.headers) as http:
        kernel = await start_kernel(http, s, "chspawner-deb--python3")
        ws = await http.ws_connect(f"{kernels_url(s)}/{kernel}/channels".replace("http", "ws", 1))
        await warm_up(ws)
        assert (await execute(ws, "v = 5"))[0] == "ok"
        manifest = snapshots / kernel / "manifest.json"

        async def saved() -> bool:
            return manifest.exists()
        await until(saved, "the kernel's session saved by itself", timeout=60)
        await ws.close()
    return json.loads(manifest.read_text()), kernel


def test_a_working_kernel_is_saved_every_autosave_interval(user, user_dir, kernel_store):
    """KernelState.autosave_interval (the spawner's kernel_autosave_interval):
    a kernel that ran a cell is saved by itself, with no request."""
    import asyncio
    from tests.harness.servers import Servers
    conf = user_dir / "conf.py"
    conf.write_text("c.ContainerKernelSpecManager.provisioner_config = "
                    "{'session_state': True}\n"
                    "c.KernelState.autosave_interval = 2.0\n"
                    "c.KernelState.limit_check_interval = 0.5\n")
    os.chmod(conf, 0o644)
    snapshots = Path(user.pw_dir) / ".local/share/chspawner/snapshots"
    s = Servers(user, user_dir, kernel_store, [
        "--ServerApp.jpserver_extensions=chspawner.persist.kernel_state=True",
        f"--config={conf}"])
    try:
        s.start()
        manifest, kernel = asyncio.run(_work_then_wait_for_autosave(s, snapshots))
    finally:
        s.close()
    assert manifest["note"] == "autosave", manifest
    assert manifest["variables"]["v"]["how"] == "saved", manifest
    shutil.rmtree(snapshots / kernel)
