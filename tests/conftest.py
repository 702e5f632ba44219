import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_DATA = REPO / "data" / "default"


@pytest.fixture(autouse=True, scope="session")
def _small_cpu():
    # Two cores: keep torch from oversubscribing when pytest runs alongside other work.
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
