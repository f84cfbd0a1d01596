"""compose.yaml, the Dockerfile and the ops scripts cannot run here (no Docker engine, no GPU):
parse them and check that they say what the README promises."""

from __future__ import annotations

import posixpath
import re
import shlex
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from typer.main import get_command

from lorafleet.scheduler.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_compose_services() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "scheduler", "worker-gpu0", "flower"} <= services.keys()
    assert "--appendonly yes" in " ".join(services["redis"]["command"])
    workers = sorted(name for name in services if name.startswith("worker"))
    assert workers == [f"worker-gpu{i}" for i in range(8)]
    for i, name in enumerate(workers):  # one GPU each, by id: never `count` (GPU 0 for all)
        [device] = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == [str(i)] and "count" not in device and "gpu" in device["capabilities"]
        assert ("profiles" in services[name]) == (i > 0)  # `up -d` starts worker-gpu0 alone
        assert services[name]["command"] == services["worker-gpu0"]["command"]
    assert "LORAFLEET_FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    for name in ("scheduler", "worker-gpu0", "flower"):
        cmd = " ".join(services[name]["command"])
        sub = cmd.split("lorafleet ", 1)[1].split()[0]
        assert sub in commands, f"{name}: lorafleet {sub} is not a CLI command"


def _compose_text(value: object) -> str:
    """A command or healthcheck as compose runs it: `$$` is compose's escape for `$`."""
    words = value if isinstance(value, list) else [value]
    return " ".join(str(w) for w in words).replace("$$", "$")


def test_no_secret_on_any_command_line() -> None:
    """`ps` shows every process's command line to every local user, containers' included:
    passwords reach processes in their environment or as configuration on stdin."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    texts = {f"compose {name}": _compose_text(svc.get("command", [])) + " " +
             _compose_text(svc.get("healthcheck", {}).get("test", [])) for name, svc in services.items()}
    texts |= {str(f.relative_to(ROOT)): f.read_text() for f in (ROOT / "ops" / "scripts").glob("*.sh")}
    for where, text in texts.items():
        assert "--requirepass" not in text, where
        assert not re.search(r"redis-cli\b[^|;&\n]*\s-[au]\b", text), where
        for flag in ("--basic-auth", "--broker", "--redis-url"):
            assert flag not in text, (where, flag)
        # the only uses of a secret variable: redis.conf on stdin, and redis-cli's variable
        rest = re.sub(r'requirepass "\$\{?REDIS_PASSWORD\}?"', "", text)
        rest = re.sub(r'REDISCLI_AUTH="\$\{?REDIS_PASSWORD\}?"', "", rest)
        rest = re.sub(r': "\$\{REDIS_PASSWORD:\?[^}]*\}"', "", rest)  # the check that it is set
        rest = re.sub(r"case \$REDIS_PASSWORD in", "", rest)
        assert not re.search(r"\$\{?\w*(PASSWORD|BASIC_AUTH|SECRET)", rest), (where, rest)
    flower = services["flower"]
    assert flower["ports"] == ["127.0.0.1:5555:5555"]  # published on the host's loopback only
    assert "--address 0.0.0.0" in _compose_text(flower["command"])  # reachable through the port


def _wait_for_auth(proc: subprocess.Popen, port: int, password: str) -> None:
    import redis

    deadline = time.monotonic() + 120  # a safety net: a loaded machine starts redis slowly
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        try:
            assert redis.Redis(port=port, password=password).ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_compose_redis_and_start_redis_take_the_password_on_stdin(tmp_path: Path) -> None:
    """The redis service's command and ops/scripts/start_redis.sh, run here with the local
    redis-server: the server requires the password, and no command line holds it."""
    from lorafleet.common.redis.connection import free_port, redis_server_binary

    binary = redis_server_binary()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("redis-server", "redis-cli"):
        if (Path(binary).parent / tool).exists():
            (bindir / tool).symlink_to(Path(binary).parent / tool)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "REDIS_PASSWORD": "pw-" + "0123456789abcdef" * 2}
    password = env["REDIS_PASSWORD"]
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    command = services["redis"]["command"]
    assert command[:2] == ["sh", "-c"]
    port = free_port()
    script = _compose_text(command[2])
    assert "docker-entrypoint.sh redis-server -" in script
    script = script.replace("docker-entrypoint.sh redis-server -",  # the image's entrypoint, then:
                            f"redis-server - --port {port} --bind 127.0.0.1")
    (tmp_path / "compose").mkdir()
    proc = subprocess.Popen(["sh", "-c", script], env=env, cwd=tmp_path / "compose",
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_auth(proc, port, password)
        assert password not in Path(f"/proc/{proc.pid}/cmdline").read_text()
        if (bindir / "redis-cli").exists():
            health = _compose_text(services["redis"]["healthcheck"]["test"][1:])
            health = health.replace("redis-cli", f"redis-cli -p {port}")
            assert subprocess.run(["sh", "-c", health], env=env, timeout=10).returncode == 0
    finally:
        _stop(proc)

    port = free_port()
    proc = subprocess.Popen(["bash", str(ROOT / "ops" / "scripts" / "start_redis.sh")],
                            env={**env, "PORT": str(port), "REDIS_DIR": str(tmp_path)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_auth(proc, port, password)
        assert password not in Path(f"/proc/{proc.pid}/cmdline").read_text()
    finally:
        _stop(proc)
    bad = subprocess.run(["bash", str(ROOT / "ops" / "scripts" / "start_redis.sh")],
                         env={**env, "REDIS_PASSWORD": 'a"b'}, capture_output=True, text=True, timeout=10)
    assert bad.returncode == 2 and "quotes" in bad.stderr


def test_dockerfile_and_scripts() -> None:
    docker = (ROOT / "ops" / "Dockerfile").read_text()
    for pkg in ("common", "scheduler", "workers"):
        assert f"COPY {pkg} {pkg}" in docker
    for script in (ROOT / "ops" / "scripts").glob("*.sh"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


# ---- the Dockerfile's Python must exist on its base image -------------------------------------
# The python3 each base OS release ships (and the only python3.X its package archive has).
OS_PYTHON = {"ubuntu20.04": "3.8", "ubuntu22.04": "3.10", "ubuntu24.04": "3.12",
             "bullseye": "3.9", "bookworm": "3.11", "trixie": "3.13"}


def base_python(image: str) -> str:
    """The Python version a base image ships: python:<ver>[-variant] images name it; an Ubuntu or
    Debian based image (ubuntu:24.04, nvidia/cuda:...-ubuntu24.04, debian:bookworm-slim) gets
    its OS release's."""
    name, _, tag = image.partition(":")
    if name.rsplit("/", 1)[-1] == "python":
        m = re.match(r"(3\.\d+)", tag)
        assert m, f"{image}: no Python version in the tag"
        return m.group(1)
    m = re.search(r"ubuntu-?(\d\d\.\d\d)", image) or (
        re.match(r"(\d\d\.\d\d)", tag) if name.endswith("ubuntu") else None)
    if m:
        release = f"ubuntu{m.group(1)}"
    else:
        release = next((r for r in OS_PYTHON if not r.startswith("ubuntu") and r in image), "")
    assert release in OS_PYTHON, f"{image}: unknown base OS release; add it to OS_PYTHON"
    return OS_PYTHON[release]


@pytest.mark.parametrize(("image", "version"), [
    ("nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04", "3.12"),
    ("nvidia/cuda:12.4.1-cudnn-devel-ubuntu22.04", "3.10"),
    ("ubuntu:24.04", "3.12"), ("ubuntu:22.04", "3.10"),
    ("debian:bookworm-slim", "3.11"), ("python:3.11-slim-bookworm", "3.11"), ("python:3.12", "3.12"),
])
def test_base_python_table(image: str, version: str) -> None:
    assert base_python(image) == version


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines()
                                            if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            op, _, args = line.strip().partition(" ")
            out.append((op.upper(), args.strip()))
    return out


def test_dockerfile_python_exists_on_its_base_image() -> None:
    instructions = dockerfile_instructions((ROOT / "ops" / "Dockerfile").read_text())
    images = [[w for w in args.split() if not w.startswith("--")][0]  # FROM [--platform=..] image [AS x]
              for op, args in instructions if op == "FROM"]
    assert images, "no FROM line"
    image = images[-1]  # the stage that becomes the image
    version = base_python(image)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert version in SpecifierSet(requires), f"{image} ships Python {version}; lorafleet needs {requires}"
    runs = " ".join(args for op, args in instructions if op in ("RUN", "CMD", "ENTRYPOINT"))
    named = set(re.findall(r"\bpython(3\.\d+)", runs))
    assert named <= {version}, f"{image} ships Python {version}; the Dockerfile names {sorted(named)}"
    assert re.search(r"\bpython3(\.\d+)?\b", runs), "the Dockerfile never installs or calls python3"
    if re.search(r"python3(\.\d+)? -m venv", runs):  # Debian/Ubuntu split ensurepip out of python3
        assert re.search(rf"apt-get install[^&;]*\bpython3(\.{version.split('.')[1]})?-venv\b", runs), \
            "python3 -m venv needs the python3-venv package"


def copied_to(instructions: list[tuple[str, str]], path: str) -> list[str]:
    """Where the Dockerfile's COPY lines put the repository file `path` (relative to the last
    WORKDIR before each COPY); COPY --from copies from another stage and is skipped."""
    workdir, out = "/", []
    for op, args in instructions:
        if op == "WORKDIR":
            workdir = posixpath.join(workdir, args)
        if op not in ("COPY", "ADD"):
            continue
        if re.search(r"(^|\s)--from", args):
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        *sources, dest = words
        dest_dir = dest.endswith("/") or len(sources) > 1 or dest in (".", "./")
        dest = posixpath.normpath(posixpath.join(workdir, dest))
        for src in sources:
            src = posixpath.normpath(src)
            if src == ".":
                out.append(posixpath.join(dest, path))
            elif (ROOT / src).is_dir() and path.startswith(src + "/"):  # a folder's contents
                out.append(posixpath.join(dest, posixpath.relpath(path, src)))
            elif src == path:
                out.append(posixpath.join(dest, posixpath.basename(src)) if dest_dir else dest)
    return out


def test_dockerfile_copies_every_file_the_package_build_needs() -> None:
    """`pip install .` in the image builds the package from what COPY put under WORKDIR: every
    package folder's __init__.py (the root __init__.py is the lorafleet package itself), the
    pyproject.toml and the README it names must land where they are in the repository."""
    instructions = dockerfile_instructions((ROOT / "ops" / "Dockerfile").read_text())
    workdir = posixpath.join("/", *[args for op, args in instructions if op == "WORKDIR"])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir = project["tool"]["setuptools"]["package-dir"]
    needed = {"pyproject.toml", project["project"]["readme"]}
    for package in project["tool"]["setuptools"]["packages"]:
        top, _, rest = package.partition(".")
        folder = posixpath.join(package_dir.get(top, top), *(rest.split(".") if rest else []))
        needed.add(posixpath.normpath(posixpath.join(folder, "__init__.py")))
    assert {"__init__.py", "common/__init__.py", "scheduler/__init__.py", "workers/__init__.py",
            "workers/multilora/__init__.py"} <= needed
    for path in sorted(needed):
        assert (ROOT / path).is_file(), path
        where = copied_to(instructions, path)
        assert posixpath.join(workdir, path) in where, f"the Dockerfile copies {path} to {where or 'nowhere'}"


# ---- several hosts: ops/compose/{redis,s3,control,gpu-node}.yaml (README "Several hosts") ------
MULTI_HOST = ("redis", "s3", "control", "gpu-node")
SECRET_VARS = ("REDIS_PASSWORD", "SENTINEL_PASSWORD", "MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY",
               "FLOWER_BASIC_AUTH", "GRAFANA_PASSWORD")


def multi_host(role: str) -> dict:
    return yaml.safe_load((ROOT / "ops" / "compose" / f"{role}.yaml").read_text())


def _env_of(svc: dict) -> dict:
    env = svc.get("environment", {})
    return env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def test_multi_host_files_parse_and_name_their_roles() -> None:
    files = sorted(p.stem for p in (ROOT / "ops" / "compose").glob("*.yaml"))
    assert files == sorted(MULTI_HOST)
    redis_svc = multi_host("redis")["services"]
    assert {"redis-primary", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"} == redis_svc.keys()
    assert {"minio", "minio-init"} == multi_host("s3")["services"].keys()
    control = multi_host("control")["services"]
    assert {"scheduler", "api", "flower", "prometheus", "grafana"} == control.keys()
    assert control["scheduler"]["deploy"]["replicas"] == 2  # leader + standby
    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    for name in ("scheduler", "api", "flower"):
        assert control[name]["command"][:2] == ["lorafleet", name] and name in commands
    workers = multi_host("gpu-node")["services"]
    assert workers and all(re.fullmatch(r"worker-gpu\d+", name) for name in workers)
    assert len(workers) == 8
    # every compose path the control host mounts exists (relative to ops/compose/)
    for svc in control.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("."):
                assert (ROOT / "ops" / "compose" / src).exists(), vol
    assert (ROOT / "ops" / "compose" / control["scheduler"]["build"]["context"] /
            control["scheduler"]["build"]["dockerfile"]).is_file()


def test_gpu_node_workers_share_nothing_and_pin_one_gpu_each() -> None:
    services = multi_host("gpu-node")["services"]
    owners: dict[str, str] = {}
    gpus = []
    for name, svc in services.items():
        cmd = svc["command"]
        assert cmd[:2] == ["lorafleet", "worker"] and cmd[cmd.index("--device") + 1] == "cuda:0"
        node = cmd[cmd.index("--node") + 1]
        assert node.startswith("${NODE_NAME:?") and node.endswith(f"-{name.split('-')[1]}"), node
        (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in dev, "count: 1 gives every container GPU 0"
        assert dev["capabilities"] == ["gpu"] and len(dev["device_ids"]) == 1
        gpus.append(dev["device_ids"][0])
        for vol in svc.get("volumes", []):
            src, dest, *mode = vol.rsplit(":", 2 if vol.endswith((":ro", ":rw")) else 1)
            assert not dest.startswith("/data/store") and dest != "/data", (name, vol)
            if src.startswith(("/", ".", "$")):  # a host path: read-only models only
                assert mode == ["ro"] and dest == "/models", (name, vol)
            else:
                assert src not in owners, f"{src} shared by {owners[src]} and {name}"
                owners[src] = name
                assert dest == _env_of(svc)["LORAFLEET_CACHE_DIR"]
    assert gpus == [str(i) for i in range(len(services))]
    assert len(owners) == len(services)  # one cache volume per worker
    assert "store" not in multi_host("gpu-node").get("volumes", {})


@pytest.mark.parametrize("role", ["control", "gpu-node"])
def test_fleet_roles_use_s3_and_the_sentinel_url(role: str) -> None:
    for name, svc in multi_host(role)["services"].items():
        env = _env_of(svc)
        if "LORAFLEET_REDIS_URL" not in env:
            assert name in ("prometheus", "grafana"), name
            continue
        assert env["LORAFLEET_STORE_URL"].startswith("s3://${S3_BUCKET:?"), name
        url = env["LORAFLEET_REDIS_URL"]
        assert url.startswith("redis+sentinel://:${REDIS_PASSWORD:?"), name
        assert "@${SENTINELS:?" in url and "}/lorafleet/0?" in url, name
        assert "wait_replicas=" in url and "sentinel_password=${SENTINEL_PASSWORD:?" in url, name
        assert env["AWS_SECRET_ACCESS_KEY"].startswith("${AWS_SECRET_ACCESS_KEY:?"), name
        assert "volumes" not in svc or all("store" not in v for v in svc["volumes"]), name


def test_redis_role_persists_and_watches_with_three_sentinels() -> None:
    services = multi_host("redis")["services"]
    for name in ("redis-primary", "redis-replica"):
        script = _compose_text(services[name]["command"])
        assert 'echo "appendonly yes"' in script and 'echo "appendfsync everysec"' in script
        assert "replica-announce-ip" in script and "masterauth" in script and "requirepass" in script
        assert services[name]["volumes"][0].endswith(":/data")
    assert _env_of(services["redis-replica"])["REPLICA_OF"] == "${REDIS_HOST:?set REDIS_HOST} 6379"
    assert "REPLICA_OF" not in _env_of(services["redis-primary"])
    sentinels = {n: s for n, s in services.items() if "--sentinel" in _compose_text(s["command"])}
    assert len(sentinels) == 3
    ports = set()
    for svc in sentinels.values():
        script = _compose_text(svc["command"])
        (monitor,) = re.findall(r"sentinel monitor (\S+) (\S+) (\d+) (\d+)", script)
        assert monitor == ("lorafleet", "$REDIS_HOST", "6379", "2")  # master name, quorum 2
        assert "sentinel auth-pass lorafleet" in script and "sentinel announce-ip" in script
        ports.add(_env_of(svc)["PORT"])
    assert ports == {"26379", "26380", "26381"}
    volumes = [s["volumes"][0].split(":")[0] for s in services.values()]
    assert len(set(volumes)) == len(volumes) == 5  # every instance its own (writable) config + data


def _all_multi_host_texts() -> dict[str, str]:
    out = {}
    for role in MULTI_HOST:
        for name, svc in multi_host(role)["services"].items():
            out[f"{role} {name}"] = " ".join(
                _compose_text(svc.get(k, [])) for k in ("command", "entrypoint")) + " " + \
                _compose_text(svc.get("healthcheck", {}).get("test", []))
    return out


def test_multi_host_no_secret_on_any_command_line() -> None:
    """Passwords only in environments (from the host's environment: `${VAR:?}`), as config
    written by shell builtins (printf), or as redis-cli's REDISCLI_AUTH."""
    for where, text in _all_multi_host_texts().items():
        assert "--requirepass" not in text and "mc alias set" not in text, where
        assert not re.search(r"redis-cli\b[^|;&\n]*\s-[au]\b", text), where
        for flag in ("--basic-auth", "--broker", "--redis-url"):
            assert flag not in text, (where, flag)
        rest = re.sub(r"printf '[^']*'(\s|\\)*(\"\$\w+\"\s*)+", "", text)  # a builtin: no argv
        rest = re.sub(r'REDISCLI_AUTH=\\?"\$\w+\\?"', "", rest)
        rest = re.sub(r': "\$\{\w+:\?[^}]*\}"', "", rest)  # the checks that they are set
        rest = re.sub(r"case (\$\w+)+ in", "", rest)
        assert not re.search(r"\$\{?\w*(PASSWORD|BASIC_AUTH|SECRET)", rest), (where, rest)
    for role in MULTI_HOST:  # no literal secret anywhere: every secret variable from the host
        for name, svc in multi_host(role)["services"].items():
            for key, value in _env_of(svc).items():
                if key in SECRET_VARS:
                    assert re.fullmatch(rf"\$\{{{key}:\?[^}}]*\}}", str(value)), (role, name, key)
                if "PASSWORD" in key or "SECRET" in key or "AUTH" in key:
                    assert str(value).startswith("${"), (role, name, key)
                if key.startswith("MC_HOST_"):
                    assert "${MINIO_ROOT_PASSWORD:?" in value


def test_every_compose_variable_is_in_the_readme_table() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Several hosts", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, re.M))
    used = set()
    for role in MULTI_HOST:
        text = (ROOT / "ops" / "compose" / f"{role}.yaml").read_text()
        used |= set(re.findall(r"(?<!\$)\$\{(\w+)", text))  # compose's own, not the shell's ($${...})
    assert used, "no ${VAR} found"
    assert used <= documented, f"not in the README table: {sorted(used - documented)}"
    for role in MULTI_HOST:
        assert f"docker compose -f ops/compose/{role}.yaml up -d" in section, role
    assert "### Redis failover and managed Redis" in readme


def test_redis_role_scripts_replicate_and_fail_over(tmp_path: Path) -> None:
    """redis.yaml's primary, replica and three Sentinels, run here with the local redis-server
    (the image's entrypoint and the fixed ports swapped for local ones): passwords off every
    command line, the replica in sync, the Sentinels agree on the primary; the primary killed -9,
    a Sentinel promotes the replica; the old primary restarted from its config comes back as a
    replica of the new one, and a restarted Sentinel still knows the new primary."""
    import redis

    from lorafleet.common.redis.connection import free_port, redis_server_binary

    services = multi_host("redis")["services"]
    password, spass = "pw-" + "0123456789abcdef" * 2, "sp-" + "fedcba9876543210" * 2
    ports = {name: free_port() for name in services}
    base = {"PATH": f"{Path(redis_server_binary()).parent}:/usr/bin:/bin", "REDIS_HOST": "127.0.0.1",
            "REDIS_PASSWORD": password, "SENTINEL_PASSWORD": spass, "SENTINEL_DOWN_AFTER_MS": "1000",
            # a failed Sentinel election retries after 2 x failover-timeout: 120 s with the
            # file's 60 s, which a loaded run hit once; the test's own Sentinels retry sooner
            "SENTINEL_FAILOVER_TIMEOUT_MS": "5000"}
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str) -> None:
        script = _compose_text(services[name]["command"][2])
        script = script.replace("docker-entrypoint.sh redis-server", "redis-server")
        script = script.replace("/data", str(tmp_path / name))
        script = script.replace(" 6379 2", f" {ports['redis-primary']} 2")  # the monitor line
        (tmp_path / name).mkdir(exist_ok=True)
        env = {**base, "PORT": str(ports[name])}
        if name == "redis-replica":
            env["REPLICA_OF"] = f"127.0.0.1 {ports['redis-primary']}"
        procs[name] = subprocess.Popen(["sh", "-c", script], env=env, cwd=tmp_path / name,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def client(name: str) -> redis.Redis:
        pw = spass if name.startswith("sentinel") else password
        # 30 s: a reply can take seconds on a loaded machine; `until` retries on a timeout anyway
        return redis.Redis(port=ports[name], password=pw, decode_responses=True, socket_timeout=30)

    def until(check, what: str, timeout_s: float = 600) -> None:
        # Waits on the condition; the deadline is a safety net, not a measured bound. A failover
        # is an election among the Sentinels, and one that fails (split votes, replies late on a
        # busy machine) is retried after 2 x failover-timeout (10 s here) as often as it takes:
        # 90 s was missed on a loaded run. The wait ends as soon as the condition holds, so a
        # large net costs nothing when things work; pytest's per-test timeout bounds the rest.
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if check():
                    return
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    def master_of(sentinel: str) -> int:
        return int(client(sentinel).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "lorafleet")[1])

    sentinels = [n for n in services if n.startswith("sentinel")]
    try:
        for name in services:
            start(name)
        until(lambda: client("redis-replica").info("replication")["master_link_status"] == "up",
              "replica in sync")
        for name, proc in procs.items():
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_text()
            assert password not in cmdline and spass not in cmdline, name
            conf = next((tmp_path / name).glob("*.conf"))
            assert conf.stat().st_mode & 0o077 == 0, conf  # the passwords are in it: owner only
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=ports["sentinel-1"]).ping()
        # a Sentinel learns the replica from the primary's INFO (every 10 s): killed before that,
        # no Sentinel can promote anyone and every election aborts (seen: epoch 59, no failover)
        for s in sentinels:
            until(lambda s=s: master_of(s) == ports["redis-primary"]
                  and len(client(s).execute_command("SENTINEL", "SENTINELS", "lorafleet")) == 2
                  and len(client(s).execute_command("SENTINEL", "REPLICAS", "lorafleet")) == 1,
                  f"{s} knows the primary, its 2 peers and the replica")
        primary = client("redis-primary")
        primary.set("k", "v")
        # WAIT's own 1 s timeout is a deadline a busy replica can miss: ask until it has acked
        until(lambda: primary.wait(1, 1000) == 1, "the replica acknowledged the write")

        procs["redis-primary"].kill()
        procs["redis-primary"].wait()
        until(lambda: all(master_of(s) == ports["redis-replica"] for s in sentinels), "failover")
        assert client("redis-replica").info("replication")["role"] == "master"
        assert client("redis-replica").get("k") == "v"
        start("redis-primary")  # from its own config: comes back, then is turned into a replica
        until(lambda: client("redis-primary").info("replication").get("master_link_status") == "up",
              "old primary follows the new one")
        assert client("redis-primary").info("replication")["master_port"] == ports["redis-replica"]
        _stop(procs["sentinel-3"])
        start("sentinel-3")
        until(lambda: master_of("sentinel-3") == ports["redis-replica"], "restarted sentinel")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                _stop(proc)


@pytest.mark.parametrize("compose_file", ["compose.yaml", "ops/compose/control.yaml"])
def test_prometheus_scrapes_with_the_metrics_token_from_a_secret(compose_file: str) -> None:
    """/metrics needs a credential: Prometheus sends the API's LORAFLEET_METRICS_TOKEN as a bearer
    token read from a file (a compose secret from METRICS_TOKEN), never written in its config."""
    prom = yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in prom["scrape_configs"] if j["job_name"] == "lorafleet"]
    auth = job["authorization"]
    assert auth == {"type": "Bearer", "credentials_file": "/run/secrets/metrics_token"}
    assert "credentials" not in auth and "bearer_token" not in job
    compose = yaml.safe_load((ROOT / compose_file).read_text())
    services = compose["services"]
    assert services["prometheus"]["secrets"] == ["metrics_token"]
    assert compose["secrets"]["metrics_token"] == {"environment": "METRICS_TOKEN"}
    token = _env_of(services["api"])["LORAFLEET_METRICS_TOKEN"]
    assert re.fullmatch(r"\$\{METRICS_TOKEN:\?[^}]+\}", token), token  # from the host, required
