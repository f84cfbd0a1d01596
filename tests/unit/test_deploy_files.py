"""compose.yaml, the Dockerfile and the ops scripts cannot run here (no Docker engine, no GPU):
parse them and check that they say what the README promises."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from typer.main import get_command

from lorafleet.scheduler.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_compose_services() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "scheduler", "worker", "flower"} <= services.keys()
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] == "yes"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["count"] == 1 and "gpu" in devices[0]["capabilities"]
    assert "LORAFLEET_FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    assert "replicas" not in services["worker"].get("deploy", {})  # scaled with --scale
    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    for name in ("scheduler", "worker", "flower"):
        cmd = " ".join(services[name]["command"])
        sub = cmd.split("lorafleet ", 1)[1].split()[0]
        assert sub in commands, f"{name}: lorafleet {sub} is not a CLI command"


def test_dockerfile_and_scripts() -> None:
    docker = (ROOT / "ops" / "Dockerfile").read_text()
    for pkg in ("common", "scheduler", "workers"):
        assert f"COPY {pkg} {pkg}" in docker
    for script in (ROOT / "ops" / "scripts").glob("*.sh"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
