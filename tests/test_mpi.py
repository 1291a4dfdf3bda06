"""MPI across nodes: an MPI program built with Debian's Open MPI inside an
image (scripts/images/mpi.sh: /usr/local/bin/mpi-ring), launched on two
nodes of the multi-node cluster (tests/harness/cluster.py) the way a site
does it, ``srun --mpi=pmix`` straight into ``chspawner run --join``, as the
unprivileged test user, with each backend.

Slurm's mpi/pmix plugin (Debian's slurm-wlm-basic-plugins, with libpmix-dev
on the host: the plugin opens pmix2/lib/libpmix.so, which only that package
has) serves PMIx in each node's slurmstepd; the image's Open MPI talks to it
through Debian's same libpmix2. Nothing of MPI is on the host.

What a site's users set, and why (the test sets exactly these):

- ``--join``: the ranks of a node share one container (one user and one
  mount namespace). Without it each rank is a container of its own, and
  Open MPI's shared-memory transport between them loses its single-copy
  mechanism (CMA, process_vm_readv: only within one user namespace) and
  says so on every rank (test_without_join_each_rank_is_its_own_container).
- ``PMIX_MCA_gds=hash``: slurmstepd's PMIx server keeps the job's data in
  shared-memory files under SlurmdSpoolDir, which a container doesn't see
  (here, with TMPDIR private, neither; at a site, /var/spool/slurmd isn't
  bound in): the PMIx client in the image then prints "PMIX ERROR ... gds_ds12
  ..." for each rank before falling back. ``hash`` has the client take the
  data over its connection to the server instead.

And one thing only this test cluster needs: its nodes are one machine, so
they share /dev/shm, where the peers of a join meet (ch-run's semaphore, the
builtin's lock file), under a tag that is by default $SLURM_STEP_ID, the
same on every node. On real nodes /dev/shm is each node's own; here a tag
per node (``--join-tag=...-$SLURMD_NODENAME``) keeps each node's ranks to
themselves.
"""
from __future__ import annotations

import os
import re
import secrets
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.harness.env import CHSPAWNER
from tests.harness.images import image_path

# The cluster fixture (tests/harness/cluster.py) starts with the first test.
pytestmark = pytest.mark.timeout(600)

RING = "/usr/local/bin/mpi-ring"
NODES, PER_NODE = 2, 2
RANKS = NODES * PER_NODE
JOB_NAME = "chspawner-mpi-test"
# mpi-ring's lines (see scripts/images/mpi.sh).
RANK_LINE = re.compile(r"rank (\d+) of (\d+) on (\S+) (user:\[\d+\]) (mnt:\[\d+\]) "
                       r"got (\d+) from (\d+)")
RING_LINE = re.compile(r"ring (\d+) total (\d+)")
# What Open MPI says (a line of its warning) when ranks on a node are in
# different user namespaces.
NO_CMA = "not available due to different user namespaces"


@pytest.fixture(scope="module")
def mpi_image() -> Path:
    return image_path("mpi")


def srun_ring(cluster, user, backend: str, image: Path, tmpdir: Path, tag: str,
              join: bool = True):
    """mpi-ring on NODES nodes, PER_NODE ranks each, every rank through
    ``chspawner run``; (srun's result, seconds it took)."""
    # sh expands $SLURMD_NODENAME on each node, for the tag of that node's
    # group (see the module's docstring).
    opts = f'--join --join-tag="{tag}-$SLURMD_NODENAME"' if join else ""
    rank = f"exec {CHSPAWNER} run --backend={backend} {opts} {image} -- {RING}"
    start = time.monotonic()
    try:
        result = cluster.run(
            "env",
            # The user's own TMPDIR (the container's /tmp): nothing of the
            # host's /tmp, Slurm's spool included, is in the container, as
            # at a site.
            f"TMPDIR={tmpdir}",
            "PMIX_MCA_gds=hash",
            "srun", f"--job-name={JOB_NAME}", "--mpi=pmix", f"--nodes={NODES}",
            f"--ntasks-per-node={PER_NODE}", "--time=5", "sh", "-c", rank,
            user=user.pw_name, check=False, timeout=180)
    finally:
        # Should it have failed or hung: nothing of it left for the next test.
        cluster.run("scancel", f"--name={JOB_NAME}", check=False)
    return result, time.monotonic() - start


def ranks_of(result) -> list[dict]:
    """mpi-ring's rank lines, as dicts, in the order it printed them."""
    ranks = [dict(zip(("rank", "size", "node", "user", "mnt", "got", "left"), m.groups()))
             for m in RANK_LINE.finditer(result.stdout)]
    for r in ranks:
        for key in ("rank", "size", "got", "left"):
            r[key] = int(r[key])
    return ranks


def assert_ring(ranks: list[dict], result, said: str) -> None:
    """The token went round: rank r got it from r-1 with 1+..+r in it (rank
    0 sends 1, each rank adds its rank+1), rank 0 got it back from the last
    with 1+..+RANKS, and rank 0 said so."""
    for r in ranks:
        n = r["rank"] or RANKS
        assert (r["left"], r["got"]) == ((r["rank"] - 1) % RANKS, n * (n + 1) // 2), said
    assert [m.groups() for m in RING_LINE.finditer(result.stdout)] == \
        [(str(RANKS), str(RANKS * (RANKS + 1) // 2))], said


def left_behind(user, tag: str) -> list[str]:
    """Rendezvous files of ``tag`` still there: ch-run's in /dev/shm, the
    builtin's in the user's private directory there."""
    private = f"/dev/shm/chspawner-{user.pw_uid}"
    names = os.listdir("/dev/shm") + (os.listdir(private) if os.path.isdir(private) else [])
    return [n for n in names if tag in n]


def test_mpi_ranks_on_two_nodes_share_one_container_per_node(cluster, rt, user, user_dir,
                                                              mpi_image):
    tag = f"mpi-{secrets.token_hex(4)}"
    result, took = srun_ring(cluster, user, rt.backend, mpi_image, user_dir, tag)
    said = f"srun exited {result.returncode} after {took:.1f} s\n" \
           f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, said
    print(f"{rt.backend}: {RANKS} ranks on {NODES} nodes in {took:.1f} s")

    ranks = ranks_of(result)
    # Every rank reported, once, and all know the job's size.
    assert [r["rank"] for r in ranks] == list(range(RANKS)), said
    assert {r["size"] for r in ranks} == {RANKS}, said

    # Two distinct nodes of the cluster, PER_NODE ranks on each (srun's
    # block distribution: ranks 0-1 on the first, 2-3 on the second).
    per_node = Counter(r["node"] for r in ranks)
    assert len(per_node) == NODES and set(per_node.values()) == {PER_NODE}, said
    assert set(per_node) <= set(cluster.nodes), said
    assert [r["node"] for r in ranks] == sorted(r["node"] for r in ranks), said

    # One container per node: the ranks of a node are in the same user and
    # mount namespaces; those of the other node in others; none in the
    # host's (pytest's own, as root, is the initial user namespace).
    containers = {node: {(r["user"], r["mnt"]) for r in ranks if r["node"] == node}
                  for node in per_node}
    assert all(len(c) == 1 for c in containers.values()), containers
    (a,), (b,) = containers.values()
    assert a[0] != b[0] and a[1] != b[1], containers
    host = os.readlink("/proc/self/ns/user"), os.readlink("/proc/self/ns/mnt")
    assert host[0] not in (a[0], b[0]) and host[1] not in (a[1], b[1]), (host, containers)

    # The messages went round the ring, within the nodes and between them.
    assert_ring(ranks, result, said)

    # Open MPI had what it wants: the node's ranks in one user namespace
    # (CMA between them), the job's data from PMIx without the spool.
    assert NO_CMA not in result.stderr, said
    assert "PMIX ERROR" not in result.stderr, said

    # The join left nothing behind in /dev/shm, on either node.
    assert left_behind(user, tag) == []


def test_without_join_each_rank_is_its_own_container(cluster, rt, user, user_dir,
                                                     mpi_image):
    """The contrast: the same launch without --join still runs MPI, but each
    rank has a container of its own, and Open MPI says what that costs."""
    result, _ = srun_ring(cluster, user, rt.backend, mpi_image, user_dir, "", join=False)
    said = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, said
    ranks = ranks_of(result)
    assert [r["rank"] for r in ranks] == list(range(RANKS)), said
    assert len({r["node"] for r in ranks}) == NODES, said
    assert len({(r["user"], r["mnt"]) for r in ranks}) == RANKS, said
    assert_ring(ranks, result, said)
    assert NO_CMA in result.stderr, said
