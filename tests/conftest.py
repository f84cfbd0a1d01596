from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache dir per test session: built-in models are built into it once."""
    return tmp_path_factory.mktemp("lorafleet-cache")
