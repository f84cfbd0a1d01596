"""A shared-nothing fleet on one machine: every process (each worker, the scheduler) is a "node"
with its own cache dir, HOME, TMPDIR and working directory, disjoint from every other node's,
and reaches the others only through Redis and the S3 store (moto_server).

Where the kernel allows it (root: `unshare -mn`), each node also runs in its own mount and
network namespaces (netns_relay.py): the file system is read-only there except its own
directory (a write to any shared path fails, EROFS), and only `lo` exists, on which relays
answer for Redis and S3 alone (their usual ports, so URLs are unchanged).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lorafleet.scheduler.client import FleetClient
from lorafleet.scheduler.embedded import LocalFleet
from lorafleet.workers.tiny_model import resolve_model_dir

RELAY = Path(__file__).with_name("netns_relay.py")
BASE_MODEL = "builtin:tiny-llama"

# Inherited variables that name a location shared by every process of the test run (the Makefile
# exports TORCH_EXTENSIONS_DIR; HF, XDG, Triton, vLLM caches): a node must derive its own from
# its HOME / LORAFLEET_CACHE_DIR instead, as on a machine of its own.
SHARED_PATH_VARS = frozenset({
    "TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME",
    "XDG_RUNTIME_DIR", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE",
    "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT",
    "PYTHONPYCACHEPREFIX", "TMP", "TEMP", "TEMPDIR", "PWD", "OLDPWD",
})


@functools.cache
def namespaces_available() -> bool:
    """Whether this process may create mount + network namespaces (root, or CAP_SYS_ADMIN)."""
    if not (shutil.which("unshare") and shutil.which("ip") and shutil.which("nsenter")):
        return False
    with tempfile.TemporaryDirectory() as root:  # the very set-up a node gets, around `true`
        probe = ["unshare", "-mn", sys.executable, str(RELAY), "node", f"--root={root}", "--", "true"]
        return subprocess.run(probe, capture_output=True, timeout=60).returncode == 0


@dataclass(frozen=True)
class Node:
    name: str
    root: Path

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def env(self) -> dict[str, str]:
        return {"LORAFLEET_CACHE_DIR": str(self.cache), "HOME": str(self.root / "home"),
                "TMPDIR": str(self.root / "tmp"),
                # the code is shared (read-only in a namespace): no bytecode written beside it
                "PYTHONDONTWRITEBYTECODE": "1"}

    def make(self) -> Node:
        for sub in ("cache", "home", "tmp", "work"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        return self


class HostRelay:
    """The host side of the namespaces' relays: one Unix socket per service (Redis, S3) that
    forwards to its TCP port on 127.0.0.1. One relay process serves every node."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports
        # short: a Unix socket path is limited to 107 bytes
        self.dir = Path(tempfile.mkdtemp(prefix="lf-relay-", dir="/tmp"))
        self.socks = {name: str(self.dir / f"{name}.sock") for name in ports}
        forwards = [f"--forward={self.socks[n]}={p}" for n, p in ports.items()]
        self.proc = subprocess.Popen([sys.executable, str(RELAY), "host", *forwards],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def node_args(self) -> list[str]:
        return [f"--forward={p}={self.socks[n]}" for n, p in self.ports.items()]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class SharedNothingFleet(LocalFleet):
    """LocalFleet whose every process is a node of its own (module doc); `relay`: run each in
    its own namespaces behind it (None: directories only)."""

    def __init__(self, nodes_root: Path, relay: HostRelay | None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.nodes_root = nodes_root
        self.relay = relay
        self.nodes: dict[str, Node] = {}
        self.launched: dict[str, dict[str, str]] = {}  # name -> the environment it last got

    def launch(self, name: str, argv: list[str],
               env: dict[str, str]) -> tuple[list[str], dict[str, str], Path]:
        # a restarted worker comes back on "its machine": the same node directory
        node = self.nodes.setdefault(name, Node(name, self.nodes_root / name)).make()
        env = {k: v for k, v in env.items() if k not in SHARED_PATH_VARS} | node.env()
        self.launched[name] = env
        if self.relay is not None:
            argv = ["unshare", "-mn", sys.executable, str(RELAY), "node", f"--root={node.root}",
                    *self.relay.node_args(), "--", *argv]
        return argv, env, node.root / "work"


def _files(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, fs in os.walk(root) for f in fs]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_shared_nothing(fleet: SharedNothingFleet, model_cache: Path) -> None:
    """Every process ran with its own directories and an S3 store only; nothing (no inode, no
    symlink target) is common to two nodes; every worker built its own base model, bit for bit
    the reference `model_cache` holds (the build is deterministic)."""
    roots = {name: node.root.resolve() for name, node in fleet.nodes.items()}
    for a, ra in roots.items():
        assert not any(b != a and (ra.is_relative_to(rb) or rb.is_relative_to(ra)) for b, rb in roots.items())
    for name, env in fleet.launched.items():
        assert env["LORAFLEET_STORE_URL"].startswith("s3://"), (name, env["LORAFLEET_STORE_URL"])
        others = [str(r) for n, r in roots.items() if n != name] + [str(model_cache)]
        leaks = {k: v for k, v in env.items() if "file://" in v or any(o in v for o in others)}
        assert leaks == {}, (name, leaks)
        for var in ("LORAFLEET_CACHE_DIR", "HOME", "TMPDIR"):
            assert Path(env[var]).resolve().is_relative_to(roots[name]), (name, var)
    owner: dict[tuple[int, int], str] = {}
    for name, root in roots.items():
        for path in _files(root):
            if path.is_symlink():
                assert path.resolve().is_relative_to(root), (name, path, path.resolve())
            st = path.stat(follow_symlinks=False)
            inode = (st.st_dev, st.st_ino)
            assert owner.setdefault(inode, name) == name, (path, owner[inode])  # a hard link across nodes
    reference = resolve_model_dir(BASE_MODEL, model_cache)
    want = {f.name: _sha256(f) for f in reference.iterdir() if f.is_file()}  # weights, config, tokenizer
    workers = [n for n in fleet.nodes if n.startswith("w")]
    assert workers
    for name in workers:
        built = resolve_model_dir(BASE_MODEL, fleet.nodes[name].cache)  # exists: never rebuilt here
        assert built.is_relative_to(roots[name])
        assert {n: _sha256(built / n) for n in want} == want, name


def processes_per_experiment(client: FleetClient, ids: list[str]) -> dict[str, int]:
    """How many worker processes (node:pid) trained steps of each experiment: > 1 means its
    adapter crossed from one process to another, and here only S3 (+ Redis) connects them."""
    return {i: len({m["worker"] for m in client.metrics(i)}) for i in ids}


PROBE = """
import json, socket, sys
redis_port, s3_port, other_port, own, shared = sys.argv[1:]
def talk(port, data):
    with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as s:
        s.sendall(data)
        return s.recv(64).decode(errors="replace")
def attempt(fn):
    try:
        return fn()
    except OSError as exc:
        return type(exc).__name__ + ":" + str(exc.errno)
def write(path):
    with open(path, "w") as f:
        f.write("x")
    return "written"
print(json.dumps({
    "interfaces": [n for _, n in socket.if_nameindex()],
    "redis": attempt(lambda: talk(redis_port, b"PING\\r\\n")),
    "s3": attempt(lambda: talk(s3_port, b"GET /moto-api/ HTTP/1.0\\r\\n\\r\\n")[:8]),
    "other": attempt(lambda: talk(other_port, b"hello")),
    "own": attempt(lambda: write(own)),
    "shared": attempt(lambda: write(shared)),
}))
"""


def probe_from_inside(fleet: SharedNothingFleet, name: str, ports: dict[str, int], other_port: int,
                      shared_dir: Path) -> dict[str, object]:
    """Run PROBE in the namespaces of node `name`'s running process: which interfaces it sees,
    what Redis, S3 and another host port answer, and whether it can write to its own directory
    and to `shared_dir`."""
    pid = fleet.procs[name].pid  # unshare execs: the node wrapper itself, inside the namespaces
    own = fleet.nodes[name].root / "tmp" / f"probe-{time.monotonic_ns()}"
    out = subprocess.run(["nsenter", "-t", str(pid), "-m", "-n", sys.executable, "-c", PROBE,
                          str(ports["redis"]), str(ports["s3"]), str(other_port), str(own),
                          str(shared_dir / "probe-write")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
