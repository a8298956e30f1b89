"""How the ranks of several hosts find each other, within one deadline, and why they did not.

**The interface.** Without `GLOO_SOCKET_IFNAME`, torch's gloo binds to the address this
host's name resolves to, and to 127.0.0.1 where it resolves to none
(`ProcessGroupGloo::createDefaultDevice`); many hosts map their name to 127.0.0.1 or
127.0.1.1 anyway. A rank then advertises a loopback address that no other host reaches,
and gloo's full-mesh connect hangs on the side that waits. So each rank finds the local
address its route to MASTER_ADDR leaves from (on the master, the address itself), takes
the interface that owns it, and sets `GLOO_SOCKET_IFNAME` and `NCCL_SOCKET_IFNAME` to
it, unless the user set them (those are checked: the named interface must exist here and
have an address). Local rank 0 of each node prints one line saying what it chose.

**The deadline.** The rendezvous at the master, the connections between the ranks and the
first collective all end within `train.collective_timeout_s`: torch bounds the
rendezvous, not the waiting side of gloo's connect, so a watchdog thread ends the rank
with one sentence when the deadline passes.

**The explanation.** Each failure is one sentence naming what the evidence shows: the
master not reachable at ADDR:PORT (and whether anything listens there), its port taken,
ranks that never reached it, a peer that advertised an address the others cannot reach,
a peer that closed its connection (it died).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from jrcl_fast.errors import RankFailure, UserError

INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
# What the torch-side waits leave of the deadline, so that torch's own, more precise error
# arrives before the watchdog has to speak.
REPORT_MARGIN_S = 2.0
# A probe of the master's port at failure time: long enough for a LAN, short against the bound.
PROBE_TIMEOUT_S = 2.0
POLL_S = 0.25  # between two tries at the master's port while it is not up yet
KEY_PREFIX = "jrcl_fast/network"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Advertised:
    """What one rank tells the others: where it runs and the address gloo/NCCL bind to."""
    rank: int
    host: str  # the network host: machine and network namespace (processes that share a loopback)
    interface: str
    address: str

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback


# ---------------------------------------------------------------- the interface

def master_endpoint() -> Endpoint:
    return Endpoint(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))


def interface_addresses() -> dict[str, list[str]]:
    """Each interface of this host with its IPv4 addresses first, then IPv6 (no link-local scope)."""
    import psutil  # a dependency of DeepSpeed

    found: dict[str, list[str]] = {}
    for name, entries in psutil.net_if_addrs().items():
        v4 = [e.address for e in entries if e.family == socket.AF_INET]
        v6 = [e.address.split("%")[0] for e in entries if e.family == socket.AF_INET6]
        if v4 or v6:
            found[name] = v4 + v6
    return found


def owner_of(address: str, interfaces: dict[str, list[str]]) -> str | None:
    return next((name for name, addresses in interfaces.items() if address in addresses), None)


def describe_interfaces(interfaces: dict[str, list[str]]) -> str:
    return ", ".join(f"{name} {addresses[0]}" for name, addresses in sorted(interfaces.items())) or "none"


def route_to(master: Endpoint, interfaces: dict[str, list[str]]) -> tuple[str, str]:
    """(local address, interface) of this host's route to `master`: the source address a
    datagram socket connected to it gets (no packet is sent)."""
    try:
        candidates = socket.getaddrinfo(master.host, master.port, type=socket.SOCK_DGRAM)
    except socket.gaierror as err:
        raise UserError(f"MASTER_ADDR={master.host} does not resolve on this host ({err.strerror}); pass "
                        "--master_addr as node 0's IP address or a name every node resolves") from None
    for family, kind, proto, _, target in candidates:
        try:
            with socket.socket(family, kind, proto) as s:
                s.connect(target)
                local = s.getsockname()[0].split("%")[0]
        except OSError:
            continue
        interface = owner_of(local, interfaces)
        if interface is not None:
            return local, interface
    raise UserError(f"no interface of this host has a route to MASTER_ADDR={master.host} (interfaces: "
                    f"{describe_interfaces(interfaces)}); pass --master_addr as an address this node reaches")


def named_interfaces(variable: str, value: str, interfaces: dict[str, list[str]]) -> list[str]:
    """The interfaces of this host that `variable`=`value` selects. NCCL reads its list as
    name prefixes ("=" first: exact names; "^" first: names to exclude); gloo as exact names."""
    names = [n.strip() for n in value.lstrip("=^").split(",") if n.strip()]
    if variable == "NCCL_SOCKET_IFNAME" and value.startswith("^"):
        return [i for i in interfaces if not any(i.startswith(n) for n in names)]
    if variable == "NCCL_SOCKET_IFNAME" and not value.startswith("="):
        return [i for i in interfaces if any(i.startswith(n) for n in names)]
    return [n for n in names if n in interfaces]


def check_user_interface(variable: str, value: str, interfaces: dict[str, list[str]], route: str) -> None:
    names = [n for n in value.lstrip("=").split(",") if n.strip()]
    selected = named_interfaces(variable, value, interfaces)
    if not selected or (variable == "GLOO_SOCKET_IFNAME" and len(selected) < len(names)):
        raise UserError(f"{variable}={value} names no interface with an address on this host (it has: "
                        f"{describe_interfaces(interfaces)}); unset it so that jrcl-fast takes the one that "
                        f"reaches MASTER_ADDR ({route} here), or name one of these")


def host_identity() -> str:
    """Processes that share a loopback share this: the machine's name and boot, and the
    network namespace (a container or a namespaced test host has its own loopback)."""
    parts = [socket.gethostname()]
    try:
        parts += [Path("/proc/sys/kernel/random/boot_id").read_text().strip(), str(os.stat("/proc/self/ns/net").st_ino)]
    except OSError:  # not Linux: the host name alone
        pass
    return ":".join(parts)


def node_ranks(rank: int, local_rank: int) -> str:
    """This node's ranks, from the launcher's local world size (deepspeed: LOCAL_SIZE,
    torchrun: LOCAL_WORLD_SIZE); both number a node's ranks contiguously."""
    size = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 0)
    first = rank - local_rank
    return f"ranks {first}-{first + size - 1}" if size > 1 else f"rank {first}" if size == 1 else f"rank {rank}"


def configure_interfaces(rank: int, local_rank: int) -> Advertised:
    """Point gloo and NCCL at the interface that reaches the master (unless the user named
    one, which is then checked), print the node's line on its local rank 0, and return what
    this rank advertises to the others."""
    master = master_endpoint()
    interfaces = interface_addresses()
    address, interface = route_to(master, interfaces)
    chosen = []
    for variable in INTERFACE_VARIABLES:
        value = os.environ.get(variable, "").strip()
        if value:
            check_user_interface(variable, value, interfaces, interface)
        else:
            os.environ[variable] = interface
            chosen.append(variable)
    gloo = os.environ["GLOO_SOCKET_IFNAME"].split(",")[0]
    if gloo != interface:  # the user's choice: gloo binds to its first address
        interface, address = gloo, interfaces[gloo][0]
    if local_rank == 0:
        origin = [f"{' and '.join(chosen)} set to it"] if chosen else []
        origin += [f"{v}={os.environ[v]} set by the user" for v in INTERFACE_VARIABLES if v not in chosen]
        node = os.environ.get("CROSS_RANK") or os.environ.get("GROUP_RANK")
        print(f"network: node {node if node is not None else '?'} ({node_ranks(rank, local_rank)}) uses interface "
              f"{interface} {address} and reaches the master at {master} ({'; '.join(origin)})", flush=True)
    return Advertised(rank, host_identity(), interface, address)


# ---------------------------------------------------------------- the explanations

def connect(master: Endpoint) -> None:
    """Open and close a TCP connection to the master's port; an OSError says why it failed."""
    socket.create_connection((master.host, master.port), timeout=PROBE_TIMEOUT_S).close()


def probe(master: Endpoint) -> str:
    """What a TCP connection to the master says now, as the second half of a sentence."""
    loopback = ""
    try:
        if ipaddress.ip_address(socket.gethostbyname(master.host)).is_loopback:
            loopback = (f"; {master.host} is this host's own loopback, so with several nodes pass node 0's "
                        "address as --master_addr")
    except (OSError, ValueError):
        pass
    try:
        connect(master)
        return (f"something listens there but the rendezvous did not complete, so port {master.port} may belong "
                f"to another job: pass another --master_port{loopback}")
    except ConnectionRefusedError:
        return ("nothing listens there: node 0 has not started, has failed (see its log) or uses another "
                f"--master_port{loopback}")
    except TimeoutError:
        return f"{master.host} does not answer: a wrong --master_addr, or a firewall drops port {master.port}"
    except OSError as err:
        return f"{err.strerror or err}: a wrong --master_addr"


def explain_rendezvous(err: BaseException | None, rank: int, world: int, serves: bool, seconds: float) -> str:
    master = master_endpoint()
    head = f"rank {rank} of {world}: "
    text = str(err or "")
    if serves and re.search(r"EADDRINUSE|address already in use", text, re.I):
        return (head + f"the master cannot listen on port {master.port}: it is taken on this host (another job, "
                "or a rank of an earlier run still alive); pass another --master_port")
    if serves:
        joined = re.search(r"(\d+)/(\d+) clients joined", text)
        count = f"only {joined.group(1)} of {world} ranks" if joined else f"not all {world} ranks"
        return (head + f"{count} reached the master at {master} within {seconds:g} s "
                "(train.collective_timeout_s): the other nodes were not started, failed before (see their logs), "
                f"or cannot reach {master.host}")
    return (head + f"the master at {master} was not reachable within {seconds:g} s (train.collective_timeout_s): "
            + probe(master))


def describe(peer: Advertised, peers: list[Advertised]) -> str:
    same = [p.rank for p in peers if p.host == peer.host]
    host = f", on the host of ranks {min(same)}-{max(same)}" if len(same) > 1 else ""
    return f"rank {peer.rank} (interface {peer.interface}, {peer.address}{host})"


def unreachable_peer(peers: list[Advertised]) -> str | None:
    """The first address the others cannot reach, by its nature: a loopback address, or an
    address two hosts share (such as a container bridge's), seen by every rank alike."""
    hosts = {p.host for p in peers}
    for peer in peers:
        if peer.is_loopback and len(hosts) > 1:
            return (f"{describe(peer, peers)} advertises a loopback address, which the ranks on other hosts cannot "
                    "reach; on that node unset GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME so that jrcl-fast takes "
                    "the interface that reaches the master, or set them to it")
        twin = next((p for p in peers if p.address == peer.address and p.host != peer.host), None)
        if twin is not None:
            return (f"{describe(peer, peers)} and {describe(twin, peers)} run on different hosts but advertise the "
                    "same address, so neither is reachable by it; set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME "
                    "on these nodes to the interface of the network the nodes share")
    return None


def explain_connect(err: BaseException | None, me: Advertised, world: int, peers: list[Advertised],
                    seconds: float) -> str:
    head = f"rank {me.rank} of {world}: "
    text = str(err or "")
    remote = re.search(r"remote=\[([^\]]+)\]", text)
    suspects = [p for p in peers if remote and p.address == remote.group(1) and p.host != me.host]
    others = [p for p in peers if p.host != me.host]
    if suspects and re.search(r"refused|reset|closed", text, re.I):
        return (head + f"{describe(suspects[0], peers)} refused or closed the connection while the ranks connected "
                "to each other: it died or was stopped (see its log)")
    if suspects:
        return (head + f"{describe(suspects[0], peers)} cannot be reached from this host ({me.interface} "
                f"{me.address}) within {seconds:g} s: set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME on that node "
                "to the interface of the network the nodes share (or a firewall blocks it)")
    listed = "; ".join(describe(p, peers) for p in others[:4]) or "none"
    detail = f" ({text.splitlines()[0]})" if text else ""
    return (head + f"the ranks did not connect to each other within {seconds:g} s (train.collective_timeout_s): "
            f"this host ({me.interface} {me.address}) may not reach the other hosts' addresses ({listed}), or a "
            f"rank died during start-up (see the other nodes' logs){detail}")


def explain_first_collective(err: BaseException | None, rank: int, world: int, seconds: float) -> str:
    detail = f" ({str(err).splitlines()[0]})" if err and str(err) else ""
    return (f"rank {rank} of {world}: the first collective after connecting did not complete within {seconds:g} s "
            f"(train.collective_timeout_s): another rank died or hangs (see the other nodes' logs){detail}")


# ---------------------------------------------------------------- the deadline

class SetupDeadline:
    """One deadline for the whole start-up. `explain(err)` of the current phase words the
    failure: raised as RankFailure where torch raises, printed before `os._exit(1)` by the
    watchdog where torch waits past the deadline."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.explain: Callable[[BaseException | None], str] = lambda err: f"start-up failed: {err}"
        self._done = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="jrcl-fast setup deadline", daemon=True)

    def remaining(self) -> timedelta:
        """What torch may wait for now: the rest of the deadline less the margin to report."""
        return timedelta(seconds=max(1.0, self.end - time.monotonic() - REPORT_MARGIN_S))

    @contextmanager
    def phase(self, explain: Callable[[BaseException | None], str]) -> Iterator[None]:
        self.explain = explain
        try:
            yield
        except (RuntimeError, ValueError) as err:  # DistError and its kin, gloo's RuntimeError
            raise RankFailure(explain(err)) from err

    def _watch(self) -> None:
        if not self._done.wait(self.end - time.monotonic()):
            sys.stdout.flush()
            sys.stderr.write(f"error: {self.explain(None)}\n")
            sys.stderr.flush()
            os._exit(1)  # torch's waits cannot be interrupted from Python

    def __enter__(self) -> SetupDeadline:
        self._watchdog.start()
        return self

    def __exit__(self, *_) -> None:
        self._done.set()


# ---------------------------------------------------------------- the start-up

def master_listens(master: Endpoint, deadline: SetupDeadline) -> bool:
    """Whether the master's port accepts a connection before the deadline, tried from
    Python: torch's store client logs each failed try with its C++ stack (about 40 lines)
    on stderr, before the one sentence that says what is wrong."""
    while time.monotonic() < deadline.end - REPORT_MARGIN_S:
        try:
            connect(master)
            return True
        except OSError:
            time.sleep(POLL_S)
    return False


def exchange(store: dist.Store, me: Advertised, world: int, deadline: SetupDeadline) -> list[Advertised]:
    """Every rank's advertised address, through the rendezvous store."""
    store.set(f"{KEY_PREFIX}/{me.rank}", json.dumps(asdict(me)))
    keys = [f"{KEY_PREFIX}/{r}" for r in range(world)]
    store.wait(keys, deadline.remaining())
    return [Advertised(**json.loads(v)) for v in store.multi_get(keys)]


def first_collective(device: torch.device, world: int) -> None:
    count = torch.ones(1, device=device)
    dist.all_reduce(count)
    if int(count.item()) != world:
        raise RuntimeError(f"the first all-reduce counted {int(count.item())} ranks instead of {world}")


def start_process_group(rank: int, local_rank: int, world: int, backend: str, device: torch.device,
                        timeout_s: float) -> None:
    """Start the default process group of a multi-rank job: the interface, the rendezvous,
    the connections and a first all-reduce, all within `timeout_s` (which then bounds every
    collective, as the process group's timeout)."""
    me = configure_interfaces(rank, local_rank)
    # Under torchrun, its agent on node 0 serves the store; otherwise rank 0 does.
    serves = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    with SetupDeadline(timeout_s) as deadline:
        with deadline.phase(lambda err: explain_rendezvous(err, rank, world, serves, timeout_s)):
            if not serves and not master_listens(master_endpoint(), deadline):
                raise RankFailure(explain_rendezvous(None, rank, world, serves, timeout_s))
            store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=deadline.remaining()))
            store.set_timeout(timedelta(seconds=timeout_s))
        peers: list[Advertised] = []
        with deadline.phase(lambda err: explain_connect(err, me, world, peers, timeout_s)):
            peers.extend(exchange(store, me, world, deadline))
            problem = unreachable_peer(peers)
            if problem:
                raise UserError(f"rank {rank} of {world}: {problem}")
            # As init_process_group keeps the default group's keys apart from other users of the store.
            dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                                    world_size=world, timeout=timedelta(seconds=timeout_s),
                                    device_id=device if device.type == "cuda" else None)
        with deadline.phase(lambda err: explain_first_collective(err, rank, world, timeout_s)):
            first_collective(device, world)
