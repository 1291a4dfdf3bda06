"""chspawner.slurm.JobWatch: one Slurm query per interval for everyone in a
process who follows a job. Unit tests against a fake client (the one
collaborator faked: it answers squeue and sacct from a table and counts
the calls); then, with the real one-node Slurm, twenty jobs followed at
once cost one squeue per round, counted by slurmctld itself (sdiag)."""
from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest

from chspawner.slurm import (Job, JobState, JobWatch, SlurmClient, SlurmError, shared_watch,
                             watch_stats)
from tests.harness.wait import until

UNREACHABLE = "squeue: error: Unable to contact slurm controller (connect failure)"


class FakeClient:
    """squeue and sacct answered from ``states`` ({id: Slurm's word}; an id
    not there is not listed), or failing with ``error``; every call kept."""

    def __init__(self, states: dict[str, str] | None = None):
        self.states = dict(states or {})
        self.accounting: dict[str, str] | None = None  # None: no slurmdbd
        self.error: str | None = None
        self.calls: list[tuple[str, ...]] = []
        self.times: list[float] = []  # (when each squeue began)

    def times_env(self) -> dict[str, str]:
        return {"SLURM_TIME_FORMAT": "%s"}

    async def run(self, *argv: str, env=None, timeout=None) -> str:
        self.calls.append(argv)
        if argv[0] == "squeue":
            self.times.append(time.monotonic())
        await asyncio.sleep(0)  # (an answer comes later, as a process's would)
        if argv[0] == "sacct":
            if self.accounting is None:
                raise SlurmError("sacct: Slurm accounting storage is disabled")
            ids = _option(argv, "--jobs").split(",")
            return "".join(f"{i}|{self.accounting[i]}\n" for i in ids if i in self.accounting)
        if self.error:
            raise SlurmError(self.error)
        if "--states=PENDING" in argv:
            return "".join(f"{i}|debug\n" for i, s in self.states.items() if s == "PENDING")
        ids = _option(argv, "--jobs").split(",")
        if len(ids) == 1 and ids[0] not in self.states:
            raise SlurmError("squeue: slurm_load_jobs error: Invalid job id specified")
        return "".join(f"{i}|{self.states[i]}|{'n1' if self.states[i] == 'RUNNING' else ''}"
                       f"|None\n" for i in ids if i in self.states)

    def squeues(self) -> list[tuple[str, ...]]:
        return [c for c in self.calls if c[0] == "squeue"]


def _option(argv: tuple[str, ...], name: str) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith(name + "="))


def _watch(client: FakeClient, interval: float = 0.05) -> JobWatch:
    return JobWatch(client, interval=interval)  # type: ignore[arg-type]


@pytest.mark.unit
def test_one_squeue_answers_every_waiter():
    """A hundred callers, one job each (and a few on the same job): one
    squeue for all, by id, every state handed to its caller."""
    client = FakeClient({str(i): "RUNNING" if i % 2 else "PENDING" for i in range(100)})

    async def main():
        watch = _watch(client)
        ids = [str(i) for i in range(100)] + ["3", "3", "7"]
        jobs = await asyncio.gather(*(watch.job(i) for i in ids))
        assert [j.id for j in jobs] == ids
        assert jobs[3] == Job("3", JobState.RUNNING, "RUNNING", "n1", "")
        assert jobs[4].state is JobState.PENDING
        assert not watch.watching  # nobody waits: no more rounds
        return watch
    watch = asyncio.run(main())
    [call] = client.squeues()
    assert call[:3] == ("squeue", "--noheader", "--states=all")
    assert _option(call, "--jobs").split(",") == [str(i) for i in range(100)]
    assert watch.stats.queries == 1 and watch.stats.jobs_last == 100


@pytest.mark.unit
def test_rounds_are_an_interval_apart_and_max_age_takes_the_last_one():
    client = FakeClient({"1": "PENDING"})

    async def main():
        watch = _watch(client, interval=0.2)
        for _ in range(3):  # a caller that asks as soon as it has its answer
            await watch.job("1")
        # Fresh enough: no query.
        assert (await watch.job("1", max_age=10)).state is JobState.PENDING
    asyncio.run(main())
    starts = client.times
    assert len(client.squeues()) == 3
    assert all(b - a >= 0.19 for a, b in zip(starts, starts[1:])), starts


@pytest.mark.unit
def test_a_failing_query_is_waited_out_and_logged_once(caplog):
    """Slurm down: a caller with a known state keeps it (a running job is
    never "gone" for a query that failed); one with none gets SlurmError;
    one warning for the whole outage, one line when Slurm answers again."""
    client = FakeClient({"1": "RUNNING"})
    caplog.set_level(logging.INFO, logger="chspawner.slurm")

    async def main():
        watch = _watch(client, interval=0.01)
        assert (await watch.job("1")).state is JobState.RUNNING
        client.error = UNREACHABLE
        for _ in range(5):
            assert (await watch.job("1")).state is JobState.RUNNING
        with pytest.raises(SlurmError, match="Unable to contact"):
            await watch.job("2")
        assert watch.error == UNREACHABLE
        client.error = None
        del client.states["1"]  # it ended meanwhile, and Slurm forgot it
        assert (await watch.job("1")).state is JobState.GONE
        assert watch.error is None
        return watch
    watch = asyncio.run(main())
    assert watch.stats.failures == 6 and watch.stats.outages == 1
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "does not answer" in m] == [
        f"chspawner: Slurm does not answer ({UNREACHABLE}): every job keeps its last "
        "known state until it does"]
    assert len([m for m in messages if "answers again" in m]) == 1
    assert any("and 6 failed queries" in m for m in messages)


@pytest.mark.unit
def test_the_watch_stops_querying_when_nobody_watches():
    client = FakeClient({"1": "RUNNING"})

    async def main():
        watch = _watch(client, interval=0.01)
        await watch.job("1")
        await until(lambda: not watch.watching, "the round task to end")
        calls = len(client.calls)
        # An interval's worth of loop turns later, still nothing asked.
        deadline = time.monotonic() + 0.1
        while time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(client.calls) == calls
        # A caller who gave up before the round is not asked about.
        waiter = asyncio.ensure_future(watch.job("2"))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        await until(lambda: not watch.watching, "the round task to end")
        return calls
    calls = asyncio.run(main())
    assert all("--jobs=2" not in c for c in client.calls[calls:])


@pytest.mark.unit
def test_a_job_squeue_forgot_is_gone_and_sacct_says_why_where_it_can():
    client = FakeClient({"1": "RUNNING", "2": "TIMEOUT"})  # (2: recent, listed)
    client.accounting = {"3": "NODE_FAIL", "4": "CANCELLED by 0"}

    async def main():
        watch = _watch(client)
        jobs = await asyncio.gather(*(watch.job(i) for i in "12345"))
        assert [(j.state, j.slurm_state) for j in jobs] == [
            (JobState.RUNNING, "RUNNING"), (JobState.GONE, "TIMEOUT"),
            (JobState.GONE, "NODE_FAIL"), (JobState.GONE, "CANCELLED"), (JobState.GONE, "")]
        # Seen gone: not asked of sacct again.
        assert (await watch.job("3")).slurm_state == "NODE_FAIL"
    asyncio.run(main())
    sacct = [c for c in client.calls if c[0] == "sacct"]
    assert len(sacct) == 1 and _option(sacct[0], "--jobs") == "3,4,5"


@pytest.mark.unit
def test_without_slurmdbd_sacct_is_asked_once(caplog):
    client = FakeClient({"1": "RUNNING"})
    caplog.set_level(logging.INFO, logger="chspawner.slurm")

    async def main():
        watch = _watch(client, interval=0.01)
        assert (await watch.job("8")).state is JobState.GONE   # (alone: "Invalid job id")
        assert (await watch.job("9")).state is JobState.GONE
        assert (await watch.job("1")).state is JobState.RUNNING
    asyncio.run(main())
    assert len([c for c in client.calls if c[0] == "sacct"]) == 1
    assert sum("no Slurm accounting here" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.unit
def test_a_slurm_that_refuses_a_list_holding_a_forgotten_id_is_asked_in_halves():
    class OldSlurm(FakeClient):
        async def run(self, *argv, env=None, timeout=None):
            if argv[0] == "squeue" and any(i not in self.states for i in
                                           _option(argv, "--jobs").split(",")):
                self.calls.append(argv)
                raise SlurmError("squeue: slurm_load_jobs error: Invalid job id specified")
            return await super().run(*argv, env=env, timeout=timeout)
    client = OldSlurm({str(i): "RUNNING" for i in range(16) if i != 5})

    async def main():
        watch = _watch(client)
        jobs = await asyncio.gather(*(watch.job(str(i)) for i in range(16)))
        assert [j.alive for j in jobs] == [i != 5 for i in range(16)]
    asyncio.run(main())
    assert len(client.squeues()) <= 2 * 4 + 1  # halvings, not one per job


@pytest.mark.unit
def test_queue_places_share_one_listing_per_interval():
    client = FakeClient({"1": "PENDING", "2": "RUNNING", "3": "PENDING"})

    async def main():
        watch = _watch(client, interval=30)
        places = await asyncio.gather(watch.queue_place("3"), watch.queue_place("1", "debug"),
                                      watch.queue_place("2"), watch.queue_place("1", "gpu"))
        assert places == [(2, 2), (1, 2), None, None]
        return watch
    watch = asyncio.run(main())
    assert len(client.calls) == 1 and watch.stats.queue_queries == 1


@pytest.mark.unit
def test_one_shared_watch_per_loop_and_identity_and_its_numbers():
    async def main() -> JobWatch:
        a = shared_watch({"PATH": "/bin"}, interval=0.5)
        b = shared_watch({"PATH": "/bin"}, interval=2.0)
        c = shared_watch({"PATH": "/usr/bin"})
        d = shared_watch({"PATH": "/bin"}, command=["site-squeue"])
        assert a is b and a.interval == 2.0  # (the latest setting)
        assert len({id(a), id(c), id(d)}) == 3
        a.stats.queries, c.stats.queries, a.stats.latency_max = 3, 4, 0.5
        stats = watch_stats()
        assert stats["queries"] >= 7 and stats["latency_max"] >= 0.5
        assert stats["watches"] >= 3
        return a
    first = asyncio.run(main())
    # Another event loop, another watch (a watch's futures are its loop's).
    assert asyncio.run(main()) is not first


# ------------------------------------------------------- real Slurm --

JOBS = 20
ROUNDS = 3


def _job_info_requests(slurm) -> int:
    """slurmctld's own count of job-information requests (sdiag's RPC
    statistics: squeue's REQUEST_JOB_INFO, or _SINGLE for one id)."""
    out = slurm.run("sdiag").stdout
    counts = {m.group(1): int(m.group(2)) for m in
              re.finditer(r"^\s*(REQUEST_\w+)\s+\(\s*\d+\)\s+count:(\d+)", out, re.M)}
    assert "statistics by message type" in out, out[-2000:]  # (none yet: 0)
    return counts.get("REQUEST_JOB_INFO", 0) + counts.get("REQUEST_JOB_INFO_SINGLE", 0)


def test_twenty_jobs_followed_at_once_cost_one_squeue_per_round(slurm, user):
    """Twenty sleeping jobs of the test user, each followed by a caller of
    its own through one watch, for three rounds: slurmctld counts one
    job-information request per round (sdiag), not one per job and round."""
    ids = [str(slurm.submit("--wrap", "sleep 300", "--job-name=chspawner-watch-test",
                            "--cpus-per-task=1", "--mem=10M", user=user.pw_name))
           for _ in range(JOBS)]
    try:
        async def follow(watch: JobWatch, job_id: str) -> Job:
            for _ in range(ROUNDS):  # as a pending server follows its job
                job = await watch.job(job_id)
            return job

        async def main() -> tuple[JobWatch, list[Job], int]:
            watch = JobWatch(SlurmClient(env=slurm.env), interval=0.3)
            before = _job_info_requests(slurm)
            jobs = await asyncio.gather(*(follow(watch, i) for i in ids))
            return watch, jobs, _job_info_requests(slurm) - before

        watch, jobs, requests = asyncio.run(main())
        assert [j.id for j in jobs] == ids and all(j.alive for j in jobs), jobs
        assert watch.stats.queries == ROUNDS and watch.stats.jobs_max == JOBS
        assert requests == ROUNDS, f"{requests} job-information requests for {ROUNDS} rounds"
        assert watch.stats.failures == 0 and watch.stats.latency_max < 5
    finally:
        slurm.run("scancel", *ids, check=False)


# ------------------------------------------- the table shared with servers --

@pytest.mark.unit
def test_followers_read_the_hubs_table_instead_of_asking_slurm(tmp_path):
    """A server's watch (a follower) lists its kernels' jobs in the shared
    directory; the hub's watch adds them to its own rounds and publishes
    the states; the follower reads them there and never runs squeue. With
    nobody publishing, it asks Slurm itself."""
    hub_slurm = FakeClient({"1": "RUNNING", "7": "PENDING", "8": "RUNNING"})
    server_slurm = FakeClient({"7": "PENDING", "8": "RUNNING"})

    async def main():
        hub = JobWatch(hub_slurm, interval=0.2, table_dir=str(tmp_path), publish=True)  # type: ignore[arg-type]
        follower = JobWatch(server_slurm, interval=0.2, table_dir=str(tmp_path))  # type: ignore[arg-type]
        # (The hub's rounds begin for a server of its own, and go on while
        # followers list jobs.)
        jobs = await asyncio.gather(hub.job("1"), follower.job("7"), follower.job("8"))
        assert [(j.id, j.state) for j in jobs] == [
            ("1", JobState.RUNNING), ("7", JobState.PENDING), ("8", JobState.RUNNING)]
        hub_slurm.states["7"] = "RUNNING"
        assert (await follower.job("7")).state is JobState.RUNNING  # (the next round's)
        assert hub.watching  # (kept going for its followers, nobody waiting here)
        assert server_slurm.calls == []
        assert (tmp_path / "follow").stat().st_mode & 0o1777 == 0o1777
        hub.close()
        await until(lambda: not hub.watching, "the hub's rounds to stop")
        # Nobody publishes: the follower asks Slurm itself (after a few
        # intervals' wait for a fresh table), then for a while at once.
        assert (await follower.job("8")).state is JobState.RUNNING
        assert (await follower.job("7")).state is JobState.PENDING
        return hub
    hub = asyncio.run(main())
    assert len(server_slurm.squeues()) == 2
    rounds = hub_slurm.squeues()
    assert all(set(_option(c, "--jobs").split(",")) <= {"1", "7", "8"} for c in rounds)
    assert any("7" in _option(c, "--jobs").split(",") for c in rounds)


@pytest.mark.unit
def test_the_hub_reads_followers_lists_warily(tmp_path):
    """Regular files only (a link or a FIFO in the shared directory is
    skipped, not followed or waited on), job ids only, fresh lists only."""
    import os
    follow = tmp_path / "follow"
    follow.mkdir()
    (follow / "a").write_text("12\n13 x;rm -rf /\n-4\n1e3\n١٢\n")
    (follow / "b").symlink_to("/etc/passwd")
    os.mkfifo(follow / "c")
    (follow / "old").write_text("99\n")
    os.utime(follow / "old", (0, 0))
    hub = JobWatch(FakeClient(), interval=0.05, table_dir=str(tmp_path), publish=True)  # type: ignore[arg-type]
    assert hub.table is not None and hub.table.followed() == ["12", "13"]


@pytest.mark.unit
def test_publishing_never_writes_through_a_link_left_in_the_directory(tmp_path):
    import os
    target = tmp_path / "elsewhere"
    target.write_text("keep\n")
    (tmp_path / "table").mkdir()
    (tmp_path / "table" / f".jobs.json.{os.getpid()}").symlink_to(target)
    hub = JobWatch(FakeClient(), table_dir=str(tmp_path / "table"), publish=True)  # type: ignore[arg-type]
    assert hub.table is not None
    hub.table.publish({"5": Job("5", JobState.RUNNING, "RUNNING", "n1")}, time.time())
    assert target.read_text() == "keep\n"
    table = (tmp_path / "table" / "jobs.json")
    assert '"5": ["RUNNING", "n1", "", null, null, null]' in table.read_text()
    assert '"queries": 0' in table.read_text()  # (the hub's numbers, for monitors)
    assert table.stat().st_mode & 0o777 == 0o644


def test_a_hub_and_its_servers_kernel_jobs_cost_one_squeue_per_round(slurm, user, tmp_path):
    """The hub's watch follows ten jobs (its servers'), a server's watch ten
    more (its kernels') through the shared table: slurmctld still counts
    one job-information request per round, all from the hub."""
    ids = [str(slurm.submit("--wrap", "sleep 300", "--job-name=chspawner-watch-test",
                            "--cpus-per-task=1", "--mem=10M", user=user.pw_name))
           for _ in range(JOBS)]
    servers, kernels = ids[:JOBS // 2], ids[JOBS // 2:]
    try:
        async def follow(watch: JobWatch, job_id: str) -> Job:
            for _ in range(ROUNDS):
                job = await watch.job(job_id)
            return job

        async def main() -> tuple[JobWatch, JobWatch, list[Job], int]:
            hub = JobWatch(SlurmClient(env=slurm.env), interval=0.3, table_dir=str(tmp_path),
                           publish=True)
            server = JobWatch(SlurmClient(env=slurm.env), interval=0.3, table_dir=str(tmp_path))
            before = _job_info_requests(slurm)
            jobs = await asyncio.gather(*(follow(hub, i) for i in servers),
                                        *(follow(server, i) for i in kernels))
            hub.close()
            return hub, server, jobs, _job_info_requests(slurm) - before

        hub, server, jobs, requests = asyncio.run(main())
        assert [j.id for j in jobs] == ids and all(j.alive for j in jobs), jobs
        assert server.stats.queries == 0 and hub.stats.jobs_max == JOBS
        assert requests == hub.stats.queries <= ROUNDS + 2, \
            f"{requests} job-information requests, {hub.stats.queries} rounds"
    finally:
        slurm.run("scancel", *ids, check=False)


@pytest.mark.unit
def test_every_slurm_spawner_of_the_hub_shares_one_watch():
    from chspawner.spawners import SlurmChSpawner

    async def main():
        a = SlurmChSpawner(slurm_env={"SLURM_CONF": "/x"}, slurm_poll_interval=2.0)
        b = SlurmChSpawner(slurm_env={"SLURM_CONF": "/x"}, queue_poll_interval=2.0)
        assert b.slurm_poll_interval == 2.0  # (the old name still read)
        assert a.job_watch() is b.job_watch() and a.job_watch().interval == 2.0
        assert a.job_watch().publish
    asyncio.run(main())
