import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from lorafleet.common.logging import (
    bind_context,
    bound_context,
    clear_context,
    configure_logging,
    get_logger,
)
from lorafleet.common.settings import Settings, redacted


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    clear_context()
    yield
    clear_context()
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_lorafleet_handler", False):
            root.removeHandler(handler)


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- settings ------------------------------------------------------------------------------------


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("DEVICE", "REDIS_URL", "STORE_URL", "CACHE_DIR", "TORCH_EXTENSIONS_DIR"):
        monkeypatch.delenv(f"LORAFLEET_{name}", raising=False)
    settings = Settings()
    assert settings.redis_url is None
    assert settings.device == "cpu"
    assert settings.dtype == "float32"
    assert settings.cache_dir == tmp_path / ".cache" / "lorafleet"
    assert settings.store_url is None
    assert settings.resolved_store_url == "file://" + str(tmp_path / ".cache" / "lorafleet" / "store")
    assert settings.resolved_torch_extensions_dir == settings.cache_dir / "torch_extensions"
    assert settings.max_spec_bytes == 65536


def test_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAFLEET_DEVICE", "cuda:1")
    monkeypatch.setenv("LORAFLEET_DTYPE", "bfloat16")
    monkeypatch.setenv("LORAFLEET_LOG_LEVEL", "debug")
    monkeypatch.setenv("LORAFLEET_TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    settings = Settings()
    assert settings.device == "cuda:1"
    assert settings.dtype == "bfloat16"
    assert settings.log_level == "DEBUG"
    assert settings.resolved_torch_extensions_dir == tmp_path / "ext"


def test_overrides_beat_env_and_bad_values_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_DEVICE", "cuda:1")
    assert Settings(device="cpu").device == "cpu"
    with pytest.raises(ValueError):
        Settings(dtype="int8")
    with pytest.raises(ValueError):
        Settings(log_level="LOUD")
    with pytest.raises(ValueError):
        Settings(max_spec_bytes=0)


def test_the_store_follows_the_cache_dir_unless_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LORAFLEET_STORE_URL", raising=False)
    monkeypatch.setenv("LORAFLEET_CACHE_DIR", str(tmp_path / "c"))
    assert Settings().resolved_store_url == f"file://{tmp_path}/c/store"
    monkeypatch.setenv("LORAFLEET_STORE_URL", "memory://elsewhere")
    assert Settings().resolved_store_url == "memory://elsewhere"


def test_worker_and_scheduler_knobs_come_from_the_same_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_LEASE_MS", "2500")
    monkeypatch.setenv("LORAFLEET_MAX_BATCH_ROWS", "16")
    monkeypatch.setenv("LORAFLEET_CHAIN_TRAIN", "0")
    s = Settings()
    assert (s.lease_ms, s.max_batch_rows, s.chain_train) == (2500, 16, False)
    flagged = s.with_overrides(node="gpu3", device=None)  # None: a flag left unset
    assert (flagged.node, flagged.device, flagged.lease_ms) == ("gpu3", s.device, 2500)
    with pytest.raises(ValueError):
        s.with_overrides(step_backend="jax")
    with pytest.raises(ValueError):
        s.with_overrides(node="../etc")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@localhost:6379/0", "redis://:***@localhost:6379/0"),
        ("rediss://user:s3cret@redis.example:6380/1", "rediss://user:***@redis.example:6380/1"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://user@localhost:6379", "redis://user@localhost:6379"),
        ("redis://h:6379/0?password=s3cret&db=2", "redis://h:6379/0?password=***&db=2"),
        ("redis://u:s3cret@[::1]:6379", "redis://u:***@[::1]:6379"),
    ],
)
def test_redacted(url: str, expected: str) -> None:
    assert redacted(url) == expected
    assert "s3cret" not in redacted(url)


def test_settings_repr_and_safe_dump_hide_the_password() -> None:
    settings = Settings(redis_url="redis://:s3cret@localhost:6379/0")
    assert settings.redis_url == "redis://:s3cret@localhost:6379/0"  # still usable
    for shown in (repr(settings), str(settings), json.dumps(settings.safe_dump())):
        assert "s3cret" not in shown
        assert "***" in shown


# -- logging -------------------------------------------------------------------------------------


def test_json_line_carries_bound_context(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json", level="INFO")
    bind_context(experiment_id="exp-1", adapter_id="ad-1", step=3, worker=None)
    get_logger("lorafleet.test").info("step_done", loss=0.5)
    captured = capsys.readouterr()
    assert captured.out == ""
    [event] = _json_lines(captured.err)
    assert event["event"] == "step_done"
    assert event["experiment_id"] == "exp-1"
    assert event["adapter_id"] == "ad-1"
    assert event["step"] == 3
    assert "worker" not in event  # None values are not bound
    assert event["level"] == "info"
    assert event["logger"] == "lorafleet.test"
    assert event["timestamp"].endswith("Z")
    assert event["loss"] == 0.5


def test_bound_context_unbinds_afterwards(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json")
    log = get_logger()
    bind_context(experiment_id="outer")
    with bound_context(experiment_id="inner", task_id="t-1"):
        log.info("inside")
    log.info("outside")
    inside, outside = _json_lines(capsys.readouterr().err)
    assert (inside["experiment_id"], inside["task_id"]) == ("inner", "t-1")
    assert outside["experiment_id"] == "outer"
    assert "task_id" not in outside


def test_configure_is_idempotent_and_filters_level(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json", level="INFO")
    configure_logging(fmt="json", level="WARNING")
    log = get_logger()
    log.info("hidden")
    log.warning("shown")
    logging.getLogger("thirdparty").warning("from stdlib")
    events = _json_lines(capsys.readouterr().err)
    assert [e["event"] for e in events] == ["shown", "from stdlib"]  # one handler, not two
    assert events[1]["logger"] == "thirdparty"


def test_pretty_and_auto_formats(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="pretty")
    get_logger().info("hello", experiment_id="exp-9")
    err = capsys.readouterr().err
    assert "hello" in err and "exp-9" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.splitlines()[0])
    configure_logging(fmt="auto")  # captured stderr is not a TTY: JSON
    get_logger().info("auto")
    [event] = _json_lines(capsys.readouterr().err)
    assert event["event"] == "auto"


def test_bad_format_or_level_is_rejected() -> None:
    with pytest.raises(ValueError):
        configure_logging(fmt="xml")
    with pytest.raises(ValueError):
        configure_logging(level="LOUD")


def test_module_level_logger_follows_later_configuration(capsys) -> None:
    """Loggers created at import time (before configure_logging) obey the level and format
    configured afterwards."""
    from lorafleet.common.logging import configure_logging, get_logger

    early = get_logger("lorafleet.early")
    configure_logging("json", "INFO")
    early.debug("hidden")
    early.info("shown", step=3)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "shown" and event["logger"] == "lorafleet.early" and event["step"] == 3
