from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache dir per test session: built-in models are built into it once."""
    return tmp_path_factory.mktemp("lorafleet-cache")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """The test process shares 2 cores with the worker processes it starts: oversubscribed torch
    threads made tests 10-50x slower. Tiny models lose nothing with one thread."""
    import torch

    torch.set_num_threads(1)
