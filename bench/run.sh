#!/bin/bash
# Set up (as root, like scripts/test.sh) and run the benchmarks; each prints
# chspawner against its anchor, side by side, with the ratio. Arguments go to
# every benchmark (e.g. --runs 50).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the benchmarks run as modules from here
export CHSPAWNER_VENV=${CHSPAWNER_VENV:-/opt/chspawner/venv}
scripts/setup.sh busybox bookworm jupyter
echo "== container start: chspawner run vs Charliecloud ch-run ($(nproc) cores, $(uname -r))"
"$CHSPAWNER_VENV/bin/python" -m bench.runtime_start --check "$@"
echo "== SquashFS images vs directories: start, files opened on the store, 100 concurrent starts"
"$CHSPAWNER_VENV/bin/python" -m bench.squash --check
echo "== images: chspawner pull vs skopeo copy + umoci unpack; import vs tar -x"
"$CHSPAWNER_VENV/bin/python" -m bench.images --check
echo "== kernels: in an image vs native; many at once"
"$CHSPAWNER_VENV/bin/python" -m bench.kernels --check
echo "== a kernel's session: snapshot and restore vs re-running the notebook; recording's overhead"
"$CHSPAWNER_VENV/bin/python" -m bench.kernel_state --check
echo "== kernels on a compute node (multi-node cluster): in an image vs native, srun and sbatch"
"$CHSPAWNER_VENV/bin/python" -m bench.node_kernels --check
echo "== listing kernels and images: records vs a walk of every image (50 images)"
"$CHSPAWNER_VENV/bin/python" -m bench.image_listing
"$CHSPAWNER_VENV/bin/python" -m bench.image_listing --delay-ms 1 --rounds 1
echo "== spawning through JupyterHub: ChSpawner in an image vs LocalProcessSpawner"
"$CHSPAWNER_VENV/bin/python" -m bench.spawn --check
echo "== spawning on Slurm: SlurmChSpawner (kernels mode, server mode) vs batchspawner"
"$CHSPAWNER_VENV/bin/python" -m bench.slurm_spawn
echo "== session proxy: chspawner-proxy vs configurable-http-proxy 5.3 (HTTP, websockets)"
"$CHSPAWNER_VENV/bin/python" -m bench.proxy --check
echo "== session proxy: 10,000 idle websockets held, memory per websocket"
"$CHSPAWNER_VENV/bin/python" -m bench.proxy_conns --connections 10000
echo "== delivery: seq in every kernel message vs today's relay (through chspawner-proxy); replay of 10,000 missed"
"$CHSPAWNER_VENV/bin/python" -m bench.delivery --check
echo "== recovery: a killed server's session back (hub, session proxy, session manager), to the next cell"
"$CHSPAWNER_VENV/bin/python" -m bench.recovery --check
echo "== recovery on Slurm: the server's job cancelled, its kernel in a job of its own"
"$CHSPAWNER_VENV/bin/python" -m bench.recovery --slurm
echo "== recovery after a node loss (multi-node cluster, center hub) vs a killed server on one host"
"$CHSPAWNER_VENV/bin/python" -m bench.node_loss --check
echo "== past the time limit: a planned move to a successor job vs the unplanned recovery (multi-node cluster, center hub)"
"$CHSPAWNER_VENV/bin/python" -m bench.walltime_move --check
echo "== a thousand users on one hub: session manager, Slurm queries, hub API, recovery; the proxy at 10,000 websockets"
"$CHSPAWNER_VENV/bin/python" -m bench.scale --check
