from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from kvcli.container.identity import cache_root

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # CI has no GPU: Triton kernels run on CPU tensors
# Tests that want automatic calibration turn it on (and point the profile directory at a temporary folder):
# the suite must never write profiles into the user's cache directory.
os.environ["KVCLI_AUTO_CALIBRATE"] = "0"
# Nor read them: a profile or digest the user's cache holds (a tiny test model's, calibrated by hand) would change
# what the no-profile tests see. The suite, and every process it starts, gets a cache directory of its own; only
# converted models are shared with the user's, since converting the default model again costs time, not truth.
_USER_MODELS = cache_root() / "models"
_USER_MODELS.mkdir(parents=True, exist_ok=True)
SUITE_CACHE = Path(tempfile.mkdtemp(prefix="kvcli-test-cache-"))
(SUITE_CACHE / "models").symlink_to(_USER_MODELS, target_is_directory=True)
os.environ["KVCLI_CACHE_DIR"] = str(SUITE_CACHE)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SUITE_CACHE, ignore_errors=True)  # removes the link to the user's models, not what it points to

from tiny_models import ARCHITECTURES, make_model_dir  # noqa: E402

pytest_plugins = ["conftest_gpu"]  # --gpu: run the kernel tests on a real GPU instead of the interpreter


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir(arch, seed=0) -> a saved model directory, built once per session."""
    made: dict[tuple[str, int], Path] = {}

    def get(arch: str, seed: int = 0) -> Path:
        if (arch, seed) not in made:
            made[(arch, seed)] = make_model_dir(arch, tmp_path_factory.mktemp(f"{arch}-{seed}"), seed)
        return made[(arch, seed)]

    return get


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from kvcli.modeling import models

    loaded: dict = {}

    def get(arch: str, seed: int = 0, dtype: str = "float32"):
        key = (arch, seed, dtype)
        if key not in loaded:
            loaded[key] = models.load(str(tiny_model_dir(arch, seed)), dtype)
        return loaded[key]

    return get


def pytest_collection_modifyitems(items):
    """Tests that load the real default model are slow, whether through the fixture or by name."""
    for item in items:
        if "default_lm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def default_lm():
    from kvcli.modeling import models

    return models.load(None, "float32")


@pytest.fixture
def cli(monkeypatch):
    """Run the CLI in-process: cli(*args, input=bytes) -> result with exit_code, stdout, stderr, stdout_bytes."""
    from typer.testing import CliRunner

    from kvcli.cli import app
    from kvcli.commands.common import state

    runner = CliRunner()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")  # reruns write identical bytes

    def run(*args, input=None):
        state["debug"] = False
        return runner.invoke(app, [str(a) for a in args], input=input)

    return run


@pytest.fixture
def llama(tiny_model_dir):
    """The tiny Llama model's directory, as a --model argument."""
    return str(tiny_model_dir("llama"))


@pytest.fixture
def kvc(cli, llama, doc_file, tmp_path):
    """A lossless cache of doc_file made by the tiny Llama model, in 32-token chunks."""
    out = tmp_path / "doc.kvc"
    result = cli("prefill", doc_file, "-o", out, "--model", llama, "--chunk-tokens", "32", "-q", "lossless")
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture
def doc_file(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("The harbour town of Velmora sits between two cliffs. Its lighthouse keeper, Anna Brisk, "
                    "has kept the lamp burning for thirty years. Every evening she climbs 112 steps.\n")
    return path


__all__ = ["ARCHITECTURES"]


@pytest.fixture(scope="module")
def s3_env():
    """moto_server on loopback with a bucket "caches", its endpoint and keys in os.environ for the module's tests."""
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto")
    from servers import moto_server

    with moto_server() as env:
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        boto3.client("s3").create_bucket(Bucket="caches")
        try:
            yield env
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
