"""The checkout's own folders never shadow an installed package, for any Python started in the repository root.

`codecs/` and `kernels/` install as `kvcli.codecs` and `kvcli.kernels`; with an `__init__.py` they would also be
importable as bare `codecs` and `kernels` from the root, and transformers imports Hugging Face's `kernels`.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent


def run_in_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


# Folders that are sys.path[0] for someone: the root (python -m, notebooks, Ray workers), bench/ (its scripts run
# from there), tests/ (conftest puts it first), examples/.
PATH_FOLDERS = ("", "bench", "tests", "examples")


def importable_names(folder: Path) -> set[str]:
    """What `import NAME` finds in `folder` ahead of site-packages: modules and regular packages."""
    return {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()} | {p.stem for p in folder.glob("*.py")}


def test_no_folder_on_a_path_shadows_an_installed_or_standard_module():
    installed = {name for name, dists in importlib.metadata.packages_distributions().items() if set(dists) != {"kvcli"}}
    taken = installed | set(sys.stdlib_module_names)
    for folder in PATH_FOLDERS:
        assert not importable_names(REPO / folder) & taken, folder
    assert not (REPO / "kernels" / "__init__.py").exists() and not (REPO / "codecs" / "__init__.py").exists()


def test_python_in_root_imports_transformers_model_code_and_kvcli():
    code = ("import kernels, transformers.models.llama.modeling_llama, kvcli.cli, kvcli.codecs.registry, "
            "kvcli.kernels.placement; print(kernels.__file__)")
    done = run_in_root("-c", code)
    assert done.returncode == 0, done.stderr
    assert not Path(done.stdout.strip()).is_relative_to(REPO / "kernels")  # the installed package, not our folder


def test_python_m_kvcli_in_root_runs_a_model(tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The library opened in 1908 on the corner of Elm Street.")
    out = tmp_path / "doc.kvc"
    model = str(tiny_model_dir("llama"))
    done = run_in_root("-m", "kvcli", "prefill", str(doc), "-o", str(out), "--model", model, "--quality", "lossless")
    assert done.returncode == 0, done.stderr
    done = run_in_root("-m", "kvcli", "generate", "--cache", str(out), "--model", model, "--max-new-tokens", "3", " Q:")
    assert done.returncode == 0, done.stderr


def test_the_wheel_lists_every_folder_of_modules():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = {setuptools["package-dir"].get(name, name.replace(".", "/")) for name in setuptools["packages"]}
    # Python modules, and the C of an extension module, which setuptools builds into its folder's package.
    folders = {str(p.parent.relative_to(REPO)) for top in ("kvcli", "codecs", "kernels") for pattern in ("*.py", "*.c")
               for p in (REPO / top).rglob(pattern)}
    assert folders == listed


def test_the_wheel_carries_every_data_file_of_its_packages():
    """Shipped profiles, their dictionaries and the calibration texts are package data: each must match one of
    pyproject's patterns, or an installed kvcli would lack it (the default model's files then name a dictionary
    no machine has)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, patterns in setuptools["package-data"].items():
        folder = REPO / setuptools["package-dir"].get(package, package.replace(".", "/"))
        data = [p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                and p.suffix not in (".py", ".c", ".h", ".so")]
        assert data, package
        missing = [str(p) for p in data if not any(p.match(pattern) and len(p.parts) == len(Path(pattern).parts)
                                                  for pattern in patterns)]
        assert not missing, f"{package}: not in [tool.setuptools.package-data]: {missing}"
