"""The benchmark still runs and prints its ratios (figures: bench/run.sh).
Each runs as a module from the repository root, as bench/run.sh runs it."""
import json
import re
import subprocess
import sys

from tests.harness.env import REPO


def test_runtime_start_benchmark_prints_ratios(user, busybox, bookworm):
    out = subprocess.run([sys.executable, "-m", "bench.runtime_start",
                          "--runs", "3"], capture_output=True, text=True,
                         check=True, timeout=300, cwd=REPO).stdout
    ratios = re.findall(r"^(/bin/true|python3 -S -c pass) .* ([\d.]+)x +[\d.]+x", out, re.M)
    assert [label for label, _ in ratios] == ["/bin/true", "python3 -S -c pass"]
    assert all(float(ratio) > 0 for _, ratio in ratios)


def test_squash_benchmark_runs(user, busybox, bookworm):
    out = subprocess.run([sys.executable, "-m", "bench.squash", "--runs", "3",
                          "--concurrent", "10", "--linger", "2"], capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    starts = re.findall(r"^(/bin/true|python3 -c pass) .* ([\d.]+)x +[\d.]+x", out.stdout, re.M)
    assert [label for label, _ in starts] == ["/bin/true", "python3 -c pass"]
    opened = re.search(r"^files opened: import json +(\d+) +(\d+)", out.stdout, re.M)
    assert opened and int(opened[1]) > 10 and int(opened[2]) == 1, out.stdout
    assert "10 concurrent starts from one SquashFS file: 10 succeeded" in out.stdout
    assert ", 0 FUSE servers left" in out.stdout


def test_kernel_benchmark_runs(user, bookworm):
    out = subprocess.run([sys.executable, "-m", "bench.kernels", "--rounds", "1",
                          "--concurrent", "3"], capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"^start to kernel_info .* [\d.]+x", out.stdout, re.M)
    assert "3/3 kernels started at once" in out.stdout
    assert "port clash: none" in out.stdout


def test_slurm_spawn_benchmark_runs(user, bookworm):
    """One round on the test Slurm cluster (the benchmark starts its own)."""
    out = subprocess.run([sys.executable, "-m", "bench.slurm_spawn",
                          "--rounds", "1"], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    ratios = re.findall(r"^SlurmChSpawner (kernels|server) mode .* ([\d.]+)x$", out.stdout,
                        re.M)
    assert [mode for mode, _ in ratios] == ["kernels", "server"], out.stdout
    assert all(float(ratio) > 0 for _, ratio in ratios)


def test_proxy_benchmark_runs():
    """Short: both proxies, every metric, a ratio each (no targets checked)."""
    out = subprocess.run([sys.executable, "-m", "bench.proxy", "--seconds", "0.5",
                          "--messages", "5000", "--rounds", "1"], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    ratios = re.findall(r"^(HTTP requests/s|HTTP p50|websocket round trip|websocket messages/s)"
                        r".* ([\d.]+)x", out.stdout, re.M)
    assert [label for label, _ in ratios] == ["HTTP requests/s", "HTTP p50",
                                              "websocket round trip", "websocket messages/s"]
    assert all(float(ratio) > 0 for _, ratio in ratios)


def test_idle_websockets_benchmark_runs():
    """Few websockets, briefly: all open, counted, closed; a cost each."""
    out = subprocess.run([sys.executable, "-m", "bench.proxy_conns", "--connections", "200",
                          "--hold", "1"], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["ok"] and result["opened"] == 200 and result["left_after_close"] == 0
    assert result["rss_per_websocket_kib"] > 0


def test_delivery_benchmark_runs(user, bookworm):
    """Small: both relays, a ratio, and a replay timed (no targets checked)."""
    out = subprocess.run([sys.executable, "-m", "bench.delivery", "--messages", "500",
                          "--missed", "300", "--rounds", "1"], capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ratio = re.search(r"^messages/s through chspawner-proxy .* ([\d.]+)x", out.stdout, re.M)
    replay = re.search(r"^reconnect to last of 300 missed \(s\) +- +([\d.]+)", out.stdout, re.M)
    assert ratio and float(ratio[1]) > 0, out.stdout
    assert replay and float(replay[1]) > 0, out.stdout


def test_recovery_benchmark_runs(user, bookworm):
    out = subprocess.run([sys.executable, "-m", "bench.recovery", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^server killed, same kernel .* [\d.]+s", out.stdout, re.M), out.stdout


def test_node_kernels_benchmark_runs(user, bookworm):
    """One round on a one-node cluster of its own: srun and sbatch, chspawner
    and native, a ratio each (no target checked)."""
    out = subprocess.run([sys.executable, "-m", "bench.node_kernels", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    ratios = re.findall(r"^(srun|sbatch): start to kernel_info .* ([\d.]+)x +[\d.]+x",
                        out.stdout, re.M)
    assert [launcher for launcher, _ in ratios] == ["srun", "sbatch"], out.stdout
    assert all(float(ratio) > 0 for _, ratio in ratios)


def test_node_loss_benchmark_runs(user, bookworm):
    """One round each: a killed server on one host, and the server's node
    lost on the multi-node cluster (its own, with PostgreSQL and a center's
    hub), with the time from Slurm's report."""
    out = subprocess.run([sys.executable, "-m", "bench.node_loss", "--rounds", "1"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^one host: server killed .* [\d.]+s", out.stdout, re.M), out.stdout
    assert re.search(r"^cluster: server node lost, kernel on another +[\d.]+s +-?[\d.]+s",
                     out.stdout, re.M), out.stdout


def test_scale_benchmark_runs():
    """A small run of bench/scale.py: every figure printed (targets not
    checked: 20 users are not 1,000)."""
    out = subprocess.run([sys.executable, "-m", "bench.scale", "--users", "20",
                          "--window", "5", "--losses", "1", "--connections", "200",
                          "--proxy-rounds", "1", "--proxy-seconds", "0.5"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for figure in (r"session manager CPU s / minute +[\d.]+",
                   r"Slurm job queries / minute, steady +\d+",
                   r"hub API calls / minute +\d+",
                   r"a server's loss to its answer again, among 20 .* [\d.]+ s",
                   r"HTTP requests/s .* [\d.]+x"):
        assert re.search(figure, out.stdout), (figure, out.stdout)


def test_image_listing_benchmark_runs(bookworm):
    out = subprocess.run([sys.executable, "-m", "bench.image_listing", "--images", "3",
                          "--rounds", "1"], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"^kernels \+ images +[\d.]+s +[\d.]+s +\d+x$", out.stdout, re.M), out.stdout
