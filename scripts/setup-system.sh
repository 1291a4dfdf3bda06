#!/bin/bash
# Install what chspawner's demo and tests need from Debian, and create the
# unprivileged user they run containers as. Run as root; idempotent.
set -euo pipefail
die() { echo "setup-system.sh: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "run me as root (I install Debian packages and create a user)"

packages=(
    python3 python3-venv        # the venv the unprivileged user can run
    charliecloud-runtime        # ch-run: the second backend and the benchmark anchor
    debootstrap busybox-static  # test and demo images
    hyperfine                   # benchmarks
    python3-ipykernel           # the native kernel image kernels are compared with
    docker-registry skopeo umoci apache2-utils  # a real registry for pull tests
    zstd xz-utils               # compressed test tarballs
    squashfuse squashfs-tools   # SquashFS images: squashfuse_ll mounts them, mksquashfs makes them
    util-linux                  # setpriv, to drop to the test user; unshare, nsenter
    iproute2                    # ip netns, a bridge, veths: the multi-node cluster (tests/harness/cluster.py)
    slurmctld slurmd slurm-client munge  # a one-node Slurm cluster (tests/harness/slurm.py)
    # Slurm's accounting, for who cancelled a job (tests/harness/slurmdbd.py;
    # the one-node cluster's option accounting=True, tests/test_kernel_endings.py).
    slurmdbd mariadb-server
    # srun --mpi=pmix (tests/test_mpi.py): Debian's Slurm has the mpi/pmix
    # plugin (slurm-wlm-basic-plugins), which opens pmix2/lib/libpmix.so,
    # and only the -dev package has that name; without it srun --mpi=pmix
    # fails ("pmi/pmix: can not load PMIx library").
    libpmix-dev
    postgresql                  # the session manager's records on PostgreSQL (tests/harness/postgres.py)
    chromium                    # the browser test (tests/test_browser.py); Playwright drives it
    ca-certificates
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$p")
done
if (( ${#missing[@]} )); then
    echo "setup-system.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >&2
fi

# SquashFS images are mounted by their user through /dev/fuse, which Linux
# makes 0666 (loading the fuse module on its first use); a machine whose
# /dev was made otherwise (some containers and VMs) gets the kernel's node.
if [[ ! -e /dev/fuse ]]; then
    modprobe fuse 2>/dev/null || true
    [[ -e /dev/fuse ]] || mknod -m 0666 /dev/fuse c 10 229 \
        || echo "setup-system.sh: no /dev/fuse: SquashFS images won't mount" >&2
fi
if [[ -c /dev/fuse && $(stat -c %a /dev/fuse) != 666 ]]; then chmod 0666 /dev/fuse; fi

# Containers need unprivileged user namespaces (Debian's switch, if present).
clone=/proc/sys/kernel/unprivileged_userns_clone
if [[ -e $clone && $(cat $clone) == 0 ]]; then echo 1 > $clone; fi
[[ $(cat /proc/sys/user/max_user_namespaces) -gt 0 ]] \
    || die "user namespaces are disabled (user.max_user_namespaces = 0)"

# Node.js and npm: JupyterHub's proxy, and the build of chspawner's JupyterLab
# extension (scripts/hatch_labextension.py, run by setup-venv.sh's install).
# Debian's npm brings Debian's nodejs; a Node.js installed otherwise (with its
# own npm) is kept.
if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >&2
fi
# JupyterHub's proxy. Debian's node-configurable-http-proxy 4.5.3 is broken
# beside this machine's Node.js; the npm registry's 5.3.0 works.
if ! command -v configurable-http-proxy >/dev/null; then
    npm install -g --silent configurable-http-proxy@5.3.0 >&2
fi

user=${CHSPAWNER_USER:-chtest}
id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
# A second ordinary account: the other user of a shared machine, for the
# tests where one user attacks another (tests/test_isolation.py and others).
other=${CHSPAWNER_OTHER_USER:-chtest2}
id "$other" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$other"
# A third, with a home as a center gives it: 120 characters deep, on another
# file system than the image stores (tmpfs here), for the whole session
# through the hub in tests/test_deep_paths.py. Made again after a reboot
# empties /dev/shm.
deep=${CHSPAWNER_DEEP_USER:-chdeep}
deep_home=/dev/shm/chspawner-homes/gpfs/home/projects/astrophysics-simulations-2026/cosmology-large-scale-structure/members/$deep
id "$deep" >/dev/null 2>&1 || useradd --no-create-home --home-dir "$deep_home" --shell /bin/bash "$deep"
deep_home=$(getent passwd "$deep" | cut -d: -f6)
if [[ ! -d $deep_home ]]; then
    mkdir -p "$deep_home"
    chown "$deep:$deep" "$deep_home"
fi
# Homes are private to their owners (Debian's useradd makes them 0755).
chmod 0750 "$(getent passwd "$user" | cut -d: -f6)" "$(getent passwd "$other" | cut -d: -f6)" \
    "$deep_home"
