#!/bin/bash
# Image recipe "mpi": Debian 12 minbase with Debian's Open MPI and a small MPI
# program built against it, /usr/local/bin/mpi-ring, for the multi-node MPI
# test (tests/test_mpi.py). Built from bookworm.sh, less its Python; the
# compiler and MPI headers are installed to build the program, then purged.
# Usage: mpi.sh TARGET_DIR   (TARGET_DIR exists and is empty; run as root)
# Any change to this file (the program's source is in it), bookworm.sh or
# lib/chroot.sh changes the cache key in scripts/build-image.sh.
#
# mpi-ring: every rank finds its rank, the job's size, its node (hostname)
# and its container (the user and mount namespaces it runs in); the ranks
# pass a token around a ring (rank r sends to r+1, the last back to 0, each
# adding r+1 to it: rank r gets r*(r+1)/2 from rank L = r-1, and rank 0
# gets size*(size+1)/2 back from the last), and rank 0 gathers one line from
# each rank (MPI_Gather) and prints them in rank order, then the ring's total
# (what rank 0 got back):
#   rank R of S on NODE user:[N] mnt:[N] got T from L
#   ring S total T
set -euo pipefail
t=${1:?usage: mpi.sh TARGET_DIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bash "$here/bookworm.sh" "$t"
source "$here/lib/chroot.sh"
chroot_begin "$t"
# The MPI program needs no Python.
in_chroot apt-get purge -y -q --autoremove python3 python3-ipykernel
# Open MPI's libraries and mpirun (openmpi-bin); libpmix2 comes with them,
# the PMIx client that talks to srun's PMIx server (Slurm's mpi/pmix plugin
# built against the same Debian libpmix2 on the host).
apt_install openmpi-bin
# What only building needs, removed after: the compiler and MPI's headers.
build=(gcc libc6-dev libopenmpi-dev)
in_chroot apt-get install -y -q --no-install-recommends "${build[@]}"
cat > "$t/tmp/mpi-ring.c" <<'EOF'
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LINE 256

static void ns(const char *name, char *out, size_t len)
{
    char path[64];
    ssize_t n;
    snprintf(path, sizeof path, "/proc/self/ns/%s", name);
    n = readlink(path, out, len - 1);
    if (n < 0)
        n = snprintf(out, len, "%s:[?]", name);
    out[n] = '\0';
}

int main(int argc, char **argv)
{
    int rank, size, left, right, token, got = 0;
    char host[MPI_MAX_PROCESSOR_NAME], user[64], mnt[64], line[LINE];
    char *all = NULL;

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (gethostname(host, sizeof host) != 0)
        strcpy(host, "?");
    host[sizeof host - 1] = '\0';
    ns("user", user, sizeof user);
    ns("mnt", mnt, sizeof mnt);

    /* The ring: rank 0 starts it with 0, each rank adds rank + 1. */
    left = (rank + size - 1) % size;
    right = (rank + 1) % size;
    if (rank == 0) {
        token = 1;
        if (size > 1) {
            MPI_Send(&token, 1, MPI_INT, right, 0, MPI_COMM_WORLD);
            MPI_Recv(&got, 1, MPI_INT, left, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else {
            got = token;
        }
    } else {
        MPI_Recv(&got, 1, MPI_INT, left, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        token = got + rank + 1;
        MPI_Send(&token, 1, MPI_INT, right, 0, MPI_COMM_WORLD);
    }

    memset(line, 0, sizeof line);
    snprintf(line, sizeof line, "rank %d of %d on %s %s %s got %d from %d",
             rank, size, host, user, mnt, got, left);
    if (rank == 0)
        all = malloc((size_t)size * LINE);
    MPI_Gather(line, LINE, MPI_CHAR, all, LINE, MPI_CHAR, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        for (int r = 0; r < size; r++)
            printf("%s\n", all + (size_t)r * LINE);
        printf("ring %d total %d\n", size, got);
        fflush(stdout);
        free(all);
    }
    MPI_Finalize();
    return 0;
}
EOF
in_chroot mpicc -O2 -Wall -Werror -o /usr/local/bin/mpi-ring /tmp/mpi-ring.c
rm "$t/tmp/mpi-ring.c"
# apt-mark: openmpi-bin stays (and what it needs); the build's packages go,
# and so does everything only they (or bookworm.sh's Python) pulled in, what
# is merely recommended too (perl, openssl, ca-certificates: ~50 MB).
in_chroot apt-mark manual openmpi-bin libopenmpi3
in_chroot apt-get purge -y -q --autoremove -o APT::AutoRemove::RecommendsImportant=false \
    -o APT::AutoRemove::SuggestsImportant=false "${build[@]}"
# The program runs against what is left (its libraries all there).
if in_chroot ldd /usr/local/bin/mpi-ring | grep -q 'not found'; then
    echo "mpi.sh: mpi-ring misses libraries after the purge" >&2
    exit 1
fi
# A file only this image has: tests read it to prove code runs in the image.
echo "chspawner test image: Debian bookworm with Open MPI" > "$t/etc/chspawner-test-image"
chroot_end
