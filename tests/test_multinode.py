"""Two hosts, for real: two network namespaces joined by a veth pair whose ends have
different names (each namespace has its own loopback, as a host does), one rank per host,
started per node as a scheduler does, with no interface variable set. Plus the pieces on
their own: SLURM's node lists, the interface checks, the explanations, the deadline.

The namespaced tests need root and iproute2 (`.ci/run` installs it); they are skipped,
saying so, only where a namespace cannot be created. Everything they create (namespaces,
veth pair, /etc/netns/<name>/hosts, processes) is removed, even when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import requires_gpu
from helpers import REPO, equivalence_config, launch, read_jsonl, run_env, tiny_config

from jrcl_fast.errors import UserError

ZERO_1 = {"zero_optimization": {"stage": 1}}
BOUND_S = 15  # train.collective_timeout_s where a test waits for it to run out
WALL: dict[str, float] = {}  # each scenario's wall time, printed at the end (pytest -s)


# ---------------------------------------------------------------- two namespaced hosts

@dataclass
class Host:
    ns: str
    name: str  # its host name in the job's node list
    interface: str
    address: str

    def cmd(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def hosts():
    """hostA (interface hA<tag>, 10.77.0.1) and hostB (ethB<tag>, 10.77.0.2), each with
    `lo` up and a hosts file naming both (ip netns exec mounts /etc/netns/<ns>/hosts over
    /etc/hosts inside the namespace only)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("two namespaced hosts need root and iproute2's ip (apt-get install -y iproute2)")
    tag = uuid.uuid4().hex[:6]  # interface names have at most 15 characters
    pair = [Host(f"jf{tag}a", f"jf{tag}n1", f"hA{tag}", "10.77.0.1"),
            Host(f"jf{tag}b", f"jf{tag}n2", f"ethB{tag}", "10.77.0.2")]
    try:
        added = _ip("netns", "add", pair[0].ns)
        if added.returncode != 0:
            pytest.skip(f"cannot create a network namespace here: {added.stderr.strip()}")
        steps = [("netns", "add", pair[1].ns),
                 ("link", "add", pair[0].interface, "type", "veth", "peer", "name", pair[1].interface)]
        for host in pair:
            steps += [("link", "set", host.interface, "netns", host.ns),
                      ("-n", host.ns, "addr", "add", f"{host.address}/24", "dev", host.interface),
                      ("-n", host.ns, "link", "set", host.interface, "up"), ("-n", host.ns, "link", "set", "lo", "up")]
            etc = Path("/etc/netns") / host.ns
            etc.mkdir(parents=True)
            (etc / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{h.address} {h.name}\n" for h in pair))
        for step in steps:
            done = _ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield pair
    finally:
        for host in pair:  # deleting a namespace deletes its end of the pair, and with it the pair
            _ip("netns", "del", host.ns)
            shutil.rmtree(Path("/etc/netns") / host.ns, ignore_errors=True)
        _ip("link", "del", pair[0].interface)  # only there if it never moved into its namespace
        print("\nwall time per scenario (s):", json.dumps({k: round(v, 1) for k, v in WALL.items()}))


@pytest.fixture(scope="module")
def processes():
    """Started node processes: each in its own session, killed with its children at the end."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start(processes, host: Host, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "w") as out:
        proc = subprocess.Popen(host.cmd(argv), cwd=REPO, env=env or run_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    processes.append(proc)
    return proc


def node_cmd(hostfile: Path, node_rank: int, port: int, config: Path, *extra: str) -> list[str]:
    """The README's per-node command (`deepspeed` is the launcher's module, as in helpers)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
            "--node_rank", str(node_rank), "--master_addr", "10.77.0.1", "--master_port", str(port),
            "--module", "jrcl_fast", "train", "--config", str(config), *extra]


def run_two_hosts(processes, hosts, config: Path, *extra: str, timeout: float = 900) -> list[str]:
    """Both nodes of the job, started as a scheduler would; returns their logs."""
    hostfile = config.parent / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    procs = [start(processes, h, node_cmd(hostfile, r, 29500, config, *extra), config.parent / f"node{r}.log")
             for r, h in enumerate(hosts)]
    for proc in procs:
        proc.wait(timeout=timeout)
    logs = [(config.parent / f"node{r}.log").read_text() for r in range(2)]
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    return logs


def network_line(log: str) -> str:
    (line,) = [x for x in log.splitlines() if x.startswith("network:")]
    return line


@pytest.fixture(scope="module")
def two_host_run(hosts, tmp_path_factory, digits_root, processes):
    """2 hosts x 1 rank, fp32, group norm, ZeRO 1, the README's commands."""
    config = equivalence_config(tmp_path_factory.mktemp("two_hosts"), "straight", digits_root, ds=ZERO_1)
    t0 = time.time()
    logs = run_two_hosts(processes, hosts, config)
    WALL["a: 2 hosts x 1 rank, 20 steps"] = time.time() - t0
    return config, logs


@pytest.mark.slow
def test_two_hosts_match_one_host_with_two_ranks(two_host_run, hosts, tmp_path, digits_root):
    config, logs = two_host_run
    for host, log in zip(hosts, logs):  # each host found its own interface, differently named
        assert f"uses interface {host.interface} {host.address} and reaches the master at 10.77.0.1:29500 " \
               "(GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME set to it)" in network_line(log)
    assert "DeepSpeed, 2 rank(s), fp32, ZeRO stage 1" in logs[0]

    one = equivalence_config(tmp_path, "one_host", digits_root, ds=ZERO_1)
    t0 = time.time()
    done = launch(one)
    WALL["a: 1 host x 2 ranks, 20 steps"] = time.time() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two_hosts, one_host = read_jsonl(config.parent / "run" / "steps.jsonl"), read_jsonl(one.parent / "run" / "steps.jsonl")
    assert len(two_hosts) == 20
    assert two_hosts == one_host  # step for step, bit for bit: the same reductions over another link


@pytest.mark.slow
def test_a_host_without_its_master_gives_up_within_the_bound(hosts, tmp_path, digits_root, processes):
    config = equivalence_config(tmp_path, "no_master", digits_root, ds=ZERO_1, collective_timeout_s=BOUND_S)
    hostfile = config.parent / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    log = config.parent / "node1.log"
    t0 = time.time()
    proc = start(processes, hosts[1], node_cmd(hostfile, 1, 29500, config), log)
    while proc.poll() is None and "network:" not in log.read_text():  # the rank reached its start-up
        time.sleep(0.05)
    reached = time.time()
    proc.wait(timeout=BOUND_S + 120)
    WALL["b: no master, bound 15 s, whole run"] = time.time() - t0
    WALL["b: from the rank's start-up"] = time.time() - reached
    text = log.read_text()
    assert proc.returncode != 0, text[-3000:]
    assert time.time() - reached < BOUND_S + 10, text[-3000:]  # the bound, plus the launcher's exit
    assert ("error: rank 1 of 2: the master at 10.77.0.1:29500 was not reachable within 15 s "
            "(train.collective_timeout_s): nothing listens there") in text, text[-3000:]
    assert "frame #" not in text and "[c10d]" not in text, text[-3000:]  # no torch C++ stack before it


@pytest.mark.slow
def test_a_killed_host_ends_the_other_and_both_resume(two_host_run, hosts, tmp_path, digits_root, processes):
    straight, _ = two_host_run
    config = equivalence_config(tmp_path, "killed", digits_root, ds=ZERO_1)
    hostfile = config.parent / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    steps = config.parent / "run" / "steps.jsonl"
    t0 = time.time()
    procs = [start(processes, h, node_cmd(hostfile, r, 29500, config), config.parent / f"node{r}.log")
             for r, h in enumerate(hosts)]
    while procs[0].poll() is None and not (steps.exists() and len(steps.read_text().splitlines()) >= 13):
        time.sleep(0.05)  # in epoch 2, after its checkpoint
    assert procs[0].poll() is None, "the job finished before a host could be killed"
    os.killpg(procs[1].pid, signal.SIGKILL)  # host B: its launcher and its rank
    killed = time.time()
    procs[0].wait(timeout=120)
    WALL["c: survivor's exit after the kill"] = time.time() - killed
    survivor = (config.parent / "node0.log").read_text()
    assert procs[0].returncode != 0
    assert "error: rank 0 of 2: a collective with the other ranks failed: another rank closed its connection, " \
           "so it died or was stopped" in survivor, survivor[-3000:]
    assert (config.parent / "run" / "checkpoints" / "latest").read_text() == "epoch_0001"

    run_two_hosts(processes, hosts, config, "--resume")
    WALL["c: killed at step 13 + both resumed"] = time.time() - t0
    assert read_jsonl(steps) == read_jsonl(straight.parent / "run" / "steps.jsonl")
    assert json.loads((config.parent / "run" / "results.json").read_text()) == json.loads(
        (straight.parent / "run" / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_the_slurm_script_starts_one_launcher_per_node(hosts, tmp_path, digits_root, processes, launcher):
    """configs/launch/slurm.sbatch on each host under emulated SLURM variables, `srun` being
    a stand-in that runs its command here (SLURM runs it once per node); the node list
    names the hosts, which resolve to their namespace addresses."""
    from jrcl_fast.launch import expand_nodelist

    config = equivalence_config(tmp_path, launcher, digits_root, ds=ZERO_1, epochs=1)
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "srun").write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n')
    (shim / "srun").chmod(0o755)
    job = str(uuid.uuid4().int % 10**6)
    nodelist = re.sub(r"1$", "[1-2]", hosts[0].name)
    assert [h.name for h in hosts] == expand_nodelist(nodelist)
    t0 = time.time()
    procs = []
    for node, host in enumerate(hosts):
        env = {**run_env(), "PATH": f"{shim}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               "SLURM_JOB_NODELIST": nodelist, "SLURM_NNODES": "2", "SLURM_NODEID": str(node),
               "SLURM_JOB_ID": job, "SLURM_GPUS_ON_NODE": "1"}
        argv = ["bash", "configs/launch/slurm.sbatch", launcher, "train", "--config", str(config)]
        procs.append(start(processes, host, argv, tmp_path / f"node{node}.log", env))
    for proc in procs:
        proc.wait(timeout=900)
    WALL[f"slurm.sbatch {launcher}, 2 hosts x 1 rank, 10 steps"] = time.time() - t0
    logs = [(tmp_path / f"node{n}.log").read_text() for n in range(2)]
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    assert {network_line(log).split(" uses interface ")[1].split(" and ")[0] for log in logs} == {
        f"{h.interface} {h.address}" for h in hosts}
    assert len(read_jsonl(config.parent / "run" / "steps.jsonl")) == 10


# ---------------------------------------------------------------- the pieces on their own

@pytest.mark.parametrize("expr, hosts", [
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
    ("gpu[008-010]", ["gpu008", "gpu009", "gpu010"]),
    ("r[1-2]n[1,3]", ["r1n1", "r1n3", "r2n1", "r2n3"]),
    ("x-1.cluster", ["x-1.cluster"]),
    ("10.77.0.[1-2],login", ["10.77.0.1", "10.77.0.2", "login"]),
])
def test_slurm_node_lists_expand_in_order(expr, hosts):
    from jrcl_fast.launch import expand_nodelist

    assert expand_nodelist(expr) == hosts


@pytest.mark.parametrize("expr", ["node[1-", "node[3-1]", "node[a-b]", "a,,b", "n[[1]]"])
def test_a_malformed_node_list_is_one_line(expr):
    from jrcl_fast.launch import expand_nodelist

    with pytest.raises(UserError, match=re.escape(repr(expr))):
        expand_nodelist(expr)


def test_scontrol_reads_the_node_list_where_it_exists(tmp_path, monkeypatch):
    from jrcl_fast.launch import job_hosts

    (tmp_path / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "s1\\ns2\\n"\n')
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert job_hosts("node[1-2]") == ["s1", "s2"]


def test_the_node_command_follows_the_slurm_variables(monkeypatch, tmp_path, digits_root):
    from jrcl_fast.launch import node_command

    config = equivalence_config(tmp_path, "cfg", digits_root)
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol
    for name, value in {"SLURM_JOB_NODELIST": "127.0.0.[1-3]", "SLURM_NNODES": "3", "SLURM_NODEID": "2",
                        "SLURM_JOB_ID": "123456"}.items():
        monkeypatch.setenv(name, value)
    train = ["train", "--config", str(config), "--set", "train.collective_timeout_s=42"]
    ds = node_command("deepspeed", train, 4)
    assert ds[ds.index("--node_rank") + 1] == "2" and ds[ds.index("--master_addr") + 1] == "127.0.0.1"
    assert ds[ds.index("--master_port") + 1] == str(20000 + 123456 % 20000) and "--no_ssh" in ds
    assert Path(ds[ds.index("--hostfile") + 1]).read_text() == "".join(f"127.0.0.{i} slots=4\n" for i in (1, 2, 3))
    tr = node_command("torchrun", train, 4, port=29400)
    assert tr[tr.index("--rdzv-conf") + 1] == "join_timeout=42,is_host=0"
    assert tr[tr.index("--rdzv-endpoint") + 1] == "127.0.0.1:29400" and tr[tr.index("--nnodes") + 1] == "3"
    assert tr[-len(train):] == train
    monkeypatch.setenv("SLURM_NNODES", "2")
    with pytest.raises(UserError, match="SLURM_NNODES=2"):
        node_command("deepspeed", train, 4)


INTERFACES = {"lo": ["127.0.0.1", "::1"], "eth0": ["10.0.0.5"], "eth1": ["192.168.1.5"], "ib0": ["10.1.0.5"]}


@pytest.mark.parametrize("variable, value, selected", [
    ("GLOO_SOCKET_IFNAME", "eth1", ["eth1"]),
    ("GLOO_SOCKET_IFNAME", "eth", []),  # gloo: exact names
    ("GLOO_SOCKET_IFNAME", "eth0,eth9", ["eth0"]),
    ("NCCL_SOCKET_IFNAME", "eth", ["eth0", "eth1"]),  # NCCL: prefixes
    ("NCCL_SOCKET_IFNAME", "=eth", []),  # "=": exact
    ("NCCL_SOCKET_IFNAME", "^lo,eth", ["ib0"]),  # "^": excluded
])
def test_interface_variables_select_as_gloo_and_nccl_read_them(variable, value, selected):
    from jrcl_fast.network import named_interfaces

    assert named_interfaces(variable, value, INTERFACES) == selected


def test_a_user_interface_that_is_not_here_is_one_line():
    from jrcl_fast.network import check_user_interface

    check_user_interface("NCCL_SOCKET_IFNAME", "eth", INTERFACES, "eth0")
    with pytest.raises(UserError, match=r"^GLOO_SOCKET_IFNAME=eth0,eth9 names no interface .*eth0 10.0.0.5.*"
                                        r"reaches MASTER_ADDR \(eth0 here\)"):
        check_user_interface("GLOO_SOCKET_IFNAME", "eth0,eth9", INTERFACES, "eth0")


def test_the_route_to_the_master_names_the_interface_that_owns_it():
    from jrcl_fast.network import Endpoint, interface_addresses, route_to

    interfaces = interface_addresses()
    assert route_to(Endpoint("127.0.0.1", 29500), interfaces) == ("127.0.0.1", next(
        name for name, addresses in interfaces.items() if "127.0.0.1" in addresses))
    with pytest.raises(UserError, match=r"^MASTER_ADDR=no-such-host.invalid does not resolve on this host"):
        route_to(Endpoint("no-such-host.invalid", 29500), interfaces)


def test_an_unreachable_advertised_address_is_named():
    from jrcl_fast.network import Advertised, unreachable_peer

    a, b = Advertised(0, "hostA", "eth0", "10.0.0.1"), Advertised(1, "hostB", "eth0", "10.0.0.2")
    assert unreachable_peer([a, b]) is None
    assert unreachable_peer([a, Advertised(1, "hostA", "lo", "127.0.0.1")]) is None  # one host: loopback is fine
    assert re.match(r"rank 1 \(interface lo, 127.0.0.1\) advertises a loopback address",
                    unreachable_peer([a, Advertised(1, "hostB", "lo", "127.0.0.1")]))
    assert "run on different hosts but advertise the same address" in unreachable_peer(
        [Advertised(0, "hostA", "docker0", "172.17.0.1"), Advertised(1, "hostB", "docker0", "172.17.0.1")])


def test_a_failed_connect_names_the_peer_and_what_it_did():
    from jrcl_fast.network import Advertised, explain_connect

    me, peer = Advertised(0, "hostA", "eth0", "10.0.0.1"), Advertised(1, "hostB", "eth0", "10.0.0.2")
    refused = RuntimeError("Gloo connectFullMesh failed with [pair.cc:152] timed out connecting: SO_ERROR: "
                           "Connection refused, remote=[10.0.0.2]:8623")
    assert "rank 1 (interface eth0, 10.0.0.2) refused or closed the connection" in \
        explain_connect(refused, me, 2, [me, peer], 30)
    silent = RuntimeError("timed out connecting: remote=[10.0.0.2]:8623")
    assert "cannot be reached from this host (eth0 10.0.0.1) within 30 s" in explain_connect(silent, me, 2,
                                                                                               [me, peer], 30)
    assert "the ranks did not connect to each other within 30 s" in explain_connect(None, me, 2, [me, peer], 30)


def test_the_master_probe_tells_nothing_listening_from_a_taken_port(monkeypatch):
    import socket

    from jrcl_fast.network import explain_rendezvous
    from jrcl_fast.runtime import free_port

    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    assert "nothing listens there" in explain_rendezvous(None, 1, 2, False, 5)
    with socket.create_server(("127.0.0.1", port)):
        assert "something listens there" in explain_rendezvous(None, 1, 2, False, 5)
        taken = RuntimeError("The server socket has failed to listen on any local network address. port: "
                             f"{port}, useIpv6: 0, code: -98, name: EADDRINUSE, message: address already in use")
        assert f"cannot listen on port {port}: it is taken" in explain_rendezvous(taken, 0, 2, True, 5)
    joined = RuntimeError("Timed out after 6 seconds waiting for clients. 1/2 clients joined.")
    assert explain_rendezvous(joined, 0, 2, True, 5).startswith(
        f"rank 0 of 2: only 1 of 2 ranks reached the master at 127.0.0.1:{port} within 5 s")


def test_a_rank_without_its_master_prints_one_sentence_and_no_torch_stack(tmp_path, digits_root):
    """torch's store client logs every failed try at the master with its C++ stack (about 40
    lines); the rank waits for the master's port itself, so stderr is the one sentence."""
    from jrcl_fast.runtime import free_port

    port = free_port()
    config = tiny_config(tmp_path, digits_root, train={"collective_timeout_s": 6})
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    done = subprocess.run([sys.executable, "-m", "jrcl_fast", "train", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"error: rank 1 of 2: the master at 127.0.0.1:{port} was not reachable within 6 s "
                               "(train.collective_timeout_s): nothing listens there")


def test_the_watchdog_ends_a_start_up_that_torch_does_not_bound():
    """A phase that waits past the deadline (as gloo's waiting side does) is ended with its
    sentence and exit code 1, in time."""
    code = ("import time\nfrom jrcl_fast.network import SetupDeadline\n"
            "with SetupDeadline(2) as d:\n    with d.phase(lambda err: 'the peers hung'):\n        time.sleep(60)\n")
    t0 = time.time()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip() == "error: the peers hung"
    assert time.time() - t0 < 30  # 2 s plus the interpreter's start on a loaded machine


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=requires_gpu)])
def test_the_bounded_start_up_brings_up_each_backend(backend):
    """The start-up path on its own, one rank: gloo on the CPU here, NCCL (bound to its
    device, initialised by the first all-reduce) on a GPU machine (benchmarks/gpu_session.sh)."""
    from jrcl_fast.runtime import free_port

    device = "torch.device('cuda', 0)" if backend == "nccl" else "torch.device('cpu')"
    code = ("import torch, torch.distributed as dist\nfrom jrcl_fast.network import start_process_group\n"
            f"start_process_group(0, 0, 1, {backend!r}, {device}, 60)\nprint('backend', dist.get_backend())\n"
            "dist.destroy_process_group()\n")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LOCAL_WORLD_SIZE": "1"}
    env.pop("GLOO_SOCKET_IFNAME", None)
    env.pop("NCCL_SOCKET_IFNAME", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"backend {backend}" in done.stdout
    assert re.search(r"network: node \? \(rank 0\) uses interface \S+ 127.0.0.1 and reaches the master at 127.0.0.1:",
                     done.stdout)
