"""The source folders kernels/ and passes/ shadow no installed package, and no two nmcompile modules import each other.

Python puts the directory of a script, or the working directory for ``python -c``, first on ``sys.path``. From the
repository's root, ``import kernels`` would find the project's own folder before an installed package named
``kernels`` (Hugging Face's, which ``transformers`` imports) if that folder were a regular package. It has no
``__init__.py``: a regular package of the same name anywhere on the path wins over it, and nmcompile places it as
its subpackage by location (``nmcompile/__init__.py``). Checked with a stand-in package of each name, for the
editable install this checkout runs on and for a wheel built from it.
"""
from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHADOWED = ("kernels", "passes")
# run at the root: the stand-ins win, and nmcompile still has its own subpackages and ops
PROBE = """
import kernels, passes
assert kernels.STAND_IN == "kernels" and passes.STAND_IN == "passes", (kernels.__file__, passes.__file__)
import torch, nmcompile
from nmcompile.kernels import catalog
from nmcompile.recipes import PRESETS
assert pathlib.Path(catalog.__file__).parent.name == "kernels" and "int8" in PRESETS
assert torch.ops.nm.luq.default is catalog.LUQ.op
print(pathlib.Path(nmcompile.__file__).parent, pathlib.Path(catalog.__file__).parent)
"""


def stand_ins(where: pathlib.Path) -> pathlib.Path:
    for name in SHADOWED:
        (where / name).mkdir(parents=True)
        (where / name / "__init__.py").write_text(f"STAND_IN = {name!r}\n")
    return where


def probe(pythonpath: list, *flags: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    done = subprocess.run([sys.executable, *flags, "-c", "import pathlib\n" + PROBE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_source_folders_are_not_regular_packages():
    for name in SHADOWED:
        assert (ROOT / name).is_dir() and not (ROOT / name / "__init__.py").exists()


def test_installed_packages_win_from_the_root_with_the_editable_install(tmp_path):
    out = probe([stand_ins(tmp_path / "site")])
    assert out.split() == [str(ROOT / "nmcompile"), str(ROOT / "kernels")]


def test_installed_packages_win_from_the_root_with_a_wheel(tmp_path):
    source = tmp_path / "source"  # a copy: setuptools builds in the source tree
    for name in ("nmcompile", *SHADOWED):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source), "-w",
                    str(tmp_path / "wheel")], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "wheel").glob("nmcompile-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} - {n.split("/")[0] for n in names if ".dist-info" in n} == {"nmcompile"}
    assert "nmcompile/kernels/catalog.py" in names and "nmcompile/kernels/nm_cpu.cpp" in names
    assert "nmcompile/passes/rewrite.py" in names and not any(n.endswith("kernels/__init__.py") for n in names)
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    site = next(p for p in sys.path if p.endswith("site-packages") and (pathlib.Path(p) / "torch").is_dir())
    # -S: no site-packages .pth files, so no editable install: the wheel, the stand-ins and torch's site-packages;
    # from the root, the checkout's nmcompile/ still comes first, and takes kernels/ and passes/ beside it
    out = probe([target, stand_ins(tmp_path / "site"), site], "-S")
    assert out.split() == [str(ROOT / "nmcompile"), str(ROOT / "kernels")]
    # away from a checkout, the wheel's own
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [target, site]))}
    done = subprocess.run([sys.executable, "-S", "-c", "import pathlib, nmcompile.kernels.catalog as c, torch\n"
                           "assert torch.ops.nm.luq.default is c.LUQ.op\nprint(pathlib.Path(c.__file__).parent)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(target / "nmcompile" / "kernels")


def _imports(path: pathlib.Path, package: str) -> set:
    """The nmcompile modules ``path`` imports (absolute and relative, at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("nmcompile")}


def _modules() -> dict:
    """module name -> its file, for nmcompile, nmcompile.kernels and nmcompile.passes."""
    roots = {"nmcompile": ROOT / "nmcompile", **{f"nmcompile.{name}": ROOT / name for name in SHADOWED}}
    modules = {}
    for prefix, folder in roots.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((prefix, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def test_no_two_modules_import_each_other():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for m in _imports(path, package) if m in modules and m != name}
    pairs = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets if a in graph.get(b, ())})
    # a package's __init__ importing its own modules is not a cycle between two modules
    pairs = [(a, b) for a, b in pairs if not (b.startswith(a + ".") or a.startswith(b + "."))]
    assert pairs == []


@pytest.mark.parametrize("name", SHADOWED)
def test_the_subpackages_are_the_checkouts_folders(name):
    import nmcompile

    module = getattr(nmcompile, name)
    assert [pathlib.Path(p) for p in module.__path__] == [ROOT / name]
