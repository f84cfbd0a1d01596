"""structlog set-up shared by every process.

JSON lines in production (stderr is not a terminal), a pretty console in a terminal. Context such
as experiment_id / adapter_id / step / worker / task_id is bound once with `bind_context` or
`bound_context` and then appears on every event, including events from stdlib `logging` users
(Celery, kombu, ...), which are routed through the same renderer.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

__all__ = [
    "bind_context",
    "bound_context",
    "clear_context",
    "configure_logging",
    "get_logger",
]

_FORMATS = ("auto", "json", "pretty")
# Marks the root handler we installed, so a second configure_logging replaces it.
_HANDLER_MARK = "_lorafleet_handler"


class _CurrentStderr:
    """A stream that writes to whatever `sys.stderr` is at write time.

    Binding the real stream at configure time would keep writing to a stale object after
    something (pytest's capture, a daemoniser) swaps `sys.stderr`.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(isatty and isatty())


_STDERR: TextIO = _CurrentStderr()  # type: ignore[assignment]


def _use_json(fmt: str) -> bool:
    if fmt not in _FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {_FORMATS}")
    if fmt == "auto":
        return not _STDERR.isatty()
    return fmt == "json"


def _level_number(level: str | int) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.strip().upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}")
    return number


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _renderer(json_lines: bool) -> Processor:
    if json_lines:
        return structlog.processors.JSONRenderer(sort_keys=True)
    return structlog.dev.ConsoleRenderer(colors=_STDERR.isatty())


def _configure_stdlib(renderer: Processor, json_lines: bool, level: int) -> None:
    pre_render: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if json_lines:
        # The console renderer formats tracebacks itself; JSON needs them as a string field.
        pre_render.append(structlog.processors.format_exc_info)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), structlog.stdlib.add_logger_name],
        processors=[*pre_render, renderer],
    )
    handler = logging.StreamHandler(_STDERR)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def configure_logging(fmt: str = "auto", level: str | int = "INFO") -> None:
    """Set up structlog (and stdlib logging) to write to stderr. Safe to call repeatedly."""
    json_lines = _use_json(fmt)
    level_no = _level_number(level)
    renderer = _renderer(json_lines)
    processors: list[Processor] = [
        *_shared_processors(),
        structlog.processors.StackInfoRenderer(),
    ]
    if json_lines:
        processors.append(structlog.processors.format_exc_info)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(file=_STDERR),
        # Caching would freeze loggers created before a later reconfigure.
        cache_logger_on_first_use=False,
    )
    _configure_stdlib(renderer, json_lines, level_no)


def get_logger(name: str | None = None) -> Any:
    """A structlog logger; `name` (usually `__name__`) is bound as the `logger` field."""
    return _NamedLogger(name) if name else structlog.get_logger()


class _NamedLogger:
    """Binds `logger=name` at each call, not once: `bind()` assembles a logger from the
    configuration of that moment, and module-level loggers exist before configure_logging()."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(structlog.get_logger().bind(logger=self._name), attr)


def bind_context(
    *,
    experiment_id: str | None = None,
    adapter_id: str | None = None,
    step: int | None = None,
    worker: str | None = None,
    task_id: str | None = None,
    **extra: Any,
) -> None:
    """Bind fields onto every later event of this thread / asyncio task. None values are skipped."""
    structlog.contextvars.bind_contextvars(
        **_present(
            experiment_id=experiment_id,
            adapter_id=adapter_id,
            step=step,
            worker=worker,
            task_id=task_id,
            **extra,
        )
    )


@contextmanager
def bound_context(**fields: Any) -> Iterator[None]:
    """Bind fields for the duration of a block, then restore what was bound before."""
    with structlog.contextvars.bound_contextvars(**_present(**fields)):
        yield


def clear_context() -> None:
    structlog.contextvars.clear_contextvars()


def _present(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}
