"""One launcher per node under SLURM: `python -m jrcl_fast.launch deepspeed|torchrun train ...`.

configs/launch/slurm.sbatch runs this once per node (srun, one task per node). It reads
the job's node list, takes its first host as the master, and starts this node's launcher
with its node rank, so the nodes need no ssh between them:

- deepspeed: `deepspeed --hostfile H --no_ssh --node_rank $SLURM_NODEID --master_addr
  FIRST --master_port P --module jrcl_fast train ...` (H: the job's hosts, `slots=` the
  ranks per node, written to a temporary file);
- torchrun: `torchrun --nnodes N --nproc-per-node R --rdzv-backend c10d --rdzv-endpoint
  FIRST:P --rdzv-id JOB --rdzv-conf join_timeout=T,is_host=0|1 --local-addr A --module
  jrcl_fast train ...`, T being the config's train.collective_timeout_s, so that
  torchrun's own rendezvous is bounded like the ranks' start-up. `is_host` says which node
  serves the rendezvous instead of torchrun guessing it from host names, and `--local-addr`
  is the address this node reaches the master from (torchrun would advertise its host
  name, which many hosts resolve to 127.0.0.1).

The node list comes from `scontrol show hostnames` where it exists, else from
`expand_nodelist`, which reads SLURM's bracket syntax (`node[01-04,07]`, `a[1-2],b3`).
`--print` prints the command instead of running it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from jrcl_fast.errors import UserError

LAUNCHERS = ("deepspeed", "torchrun")
# Jobs that share a node must not share a port: the port follows the job id.
PORT_BASE, PORT_SPAN = 20000, 20000


def _expand_range(body: str, expr: str) -> list[str]:
    """`01-04,07` -> 01 02 03 04 07; a range keeps the zero padding of its first bound."""
    out = []
    for part in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise UserError(f"node list {expr!r}: cannot read the range {part!r} (expected N or N-M with N <= M)")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return out


def _split_top_level(expr: str) -> list[str]:
    """Split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise UserError(f"node list {expr!r}: unbalanced or nested brackets")
        if ch == "," and depth == 0:
            items.append(expr[start:i])
            start = i + 1
    if depth:
        raise UserError(f"node list {expr!r}: unbalanced brackets")
    return [*items, expr[start:]]


def expand_nodelist(expr: str) -> list[str]:
    """SLURM's host list syntax, in order: `node[01-04,07]`, `a[1-2],b3`, `r[1-2]n[1-2]`."""
    hosts: list[str] = []
    for item in _split_top_level(expr.strip()):
        if not item:
            raise UserError(f"node list {expr!r}: an empty host name")
        names = [""]
        for literal, body in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            names = [n + literal for n in names]
            if body:
                names = [n + r for n in names for r in _expand_range(body, expr)]
        hosts += names
    return hosts


def job_hosts(nodelist: str) -> list[str]:
    """The job's hosts: from `scontrol show hostnames` where SLURM's tools are installed."""
    if shutil.which("scontrol"):
        done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.split():
            return done.stdout.split()
    return expand_nodelist(nodelist)


def _slurm(name: str, fallback: str | None = None) -> str:
    value = os.environ.get(name, fallback)
    if value is None:
        raise UserError(f"{name} is not set: run this inside a SLURM job step (srun), one task per node, as "
                        "configs/launch/slurm.sbatch does")
    return value


def _bound_s(train_args: list[str]) -> float:
    """train.collective_timeout_s of the config the job trains (with its --set overrides)."""
    from jrcl_fast.config import load_config

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    known, _ = parser.parse_known_args(train_args)
    return load_config(known.config, known.overrides).train.collective_timeout_s


def node_command(launcher: str, train_args: list[str], ranks_per_node: int, port: int | None = None) -> list[str]:
    """This node's launcher command, from the SLURM variables of its job step."""
    hosts = job_hosts(_slurm("SLURM_JOB_NODELIST", os.environ.get("SLURM_NODELIST")))
    node, job = int(_slurm("SLURM_NODEID")), _slurm("SLURM_JOB_ID", "0")
    if len(hosts) != int(_slurm("SLURM_NNODES", str(len(hosts)))) or not 0 <= node < len(hosts):
        raise UserError(f"SLURM_JOB_NODELIST has {len(hosts)} host(s), SLURM_NNODES={os.environ.get('SLURM_NNODES')} "
                        f"and SLURM_NODEID={node}: they disagree; run one task per node")
    master = hosts[0]
    port = port or PORT_BASE + int(job) % PORT_SPAN
    if launcher == "deepspeed":
        hostfile = Path(tempfile.gettempdir()) / f"jrcl-fast-job{job}-node{node}.hostfile"
        hostfile.write_text("".join(f"{h} slots={ranks_per_node}\n" for h in hosts))
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                "--node_rank", str(node), "--master_addr", master, "--master_port", str(port),
                "--module", "jrcl_fast", *train_args]
    from jrcl_fast.network import Endpoint, interface_addresses, route_to

    local_addr, _ = route_to(Endpoint(master, port), interface_addresses())
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(hosts)),
            "--nproc-per-node", str(ranks_per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{master}:{port}",
            "--rdzv-id", f"jrcl-fast-{job}",
            "--rdzv-conf", f"join_timeout={int(_bound_s(train_args))},is_host={int(node == 0)}",
            "--local-addr", local_addr, "--max-restarts", "0", "--module", "jrcl_fast", *train_args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jrcl_fast.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("launcher", choices=LAUNCHERS)
    parser.add_argument("--ranks-per-node", type=int, default=int(os.environ.get("SLURM_GPUS_ON_NODE") or 0),
                        help="ranks on each node (default: SLURM_GPUS_ON_NODE)")
    parser.add_argument("--port", type=int, help=f"the master's port (default: {PORT_BASE} + job id mod {PORT_SPAN})")
    parser.add_argument("--print", action="store_true", help="print the command instead of running it")
    parser.epilog = "then jrcl-fast's arguments: train --config FILE [--set KEY=VALUE] [--resume]"
    argv = sys.argv[1:] if argv is None else argv
    if "train" not in argv:
        parser.error("pass jrcl-fast's arguments after the launcher's: ... train --config FILE [--set KEY=VALUE]")
    split = argv.index("train")
    args = parser.parse_args(argv[:split])
    try:
        if args.ranks_per_node < 1:
            raise UserError("the ranks per node are unknown: request GPUs (--gpus-per-node) or pass --ranks-per-node")
        cmd = node_command(args.launcher, argv[split:], args.ranks_per_node, args.port)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print:
        print(shlex.join(cmd))
        return 0
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
