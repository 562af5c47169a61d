"""The non-editable install: build a wheel, install it into a fresh venv, import, run one op."""

import os
import pathlib
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _source_packages():
    """Every package of the source tree, by its installed name."""
    pkgs = {"fastfactor.kernels"}
    for init in (ROOT / "fastfactor").rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        pkgs.add(".".join(rel.parts))
    return pkgs


def _bare_venv(tmp_path):
    """``(venv, its python)``: a fresh venv without fastfactor, whose dependencies (torch, triton,
    numpy) come from the test environment through a ``.pth`` file."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    site = subprocess.run(
        [str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    pathlib.Path(site, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv, vpy


@pytest.mark.slow
def test_wheel_install_in_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        check=True, cwd=tmp_path,
    )
    (wheel,) = dist.glob("fastfactor-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "fastfactor/kernels/lowrank.py" in names
    assert "fastfactor/kernels/_config.py" in names
    missing = [p for p in _source_packages() if p.replace(".", "/") + "/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel (add them to pyproject.toml): {missing}"
    assert any(n.endswith("entry_points.txt") for n in names)

    venv, vpy = _bare_venv(tmp_path)  # fastfactor only from the wheel
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "-q", str(wheel)],
        check=True,
    )
    code = (
        "import fastfactor, fastfactor.kernels.lowrank as K, torch\n"
        f"assert fastfactor.__file__.startswith({str(venv)!r}), fastfactor.__file__\n"
        f"assert K.__file__.startswith({str(venv)!r}), K.__file__\n"
        "x, u, v = torch.randn(3, 8), torch.randn(5, 2), torch.randn(2, 8)\n"
        "y = fastfactor.lowrank_linear(x, u, v)\n"
        "torch.testing.assert_close(y, x @ v.t() @ u.t())\n"
        "print('ok', K.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    out = subprocess.run([str(vpy), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.stdout.startswith("ok")
    cli = subprocess.run([str(venv / "bin" / "fastfactor"), "--help"], capture_output=True, text=True, env=env)
    assert cli.returncode == 0 and "compile-check" in cli.stdout


@pytest.mark.slow
def test_source_tree_runs_without_install(tmp_path):
    """On a machine where nothing can be installed (a lent GPU box without network), the checkout
    itself runs with PYTHONPATH=<repo>: kernels/ is mapped to fastfactor.kernels on import."""
    _, vpy = _bare_venv(tmp_path)
    code = (
        "import fastfactor, fastfactor.kernels.lowrank as K, torch\n"
        f"assert fastfactor.__file__.startswith({str(ROOT)!r}), fastfactor.__file__\n"
        "x, u, v = torch.randn(3, 8), torch.randn(5, 2), torch.randn(2, 8)\n"
        "torch.testing.assert_close(fastfactor.lowrank_linear(x, u, v), x @ v.t() @ u.t())\n"
        "import fastfactor.cli; print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([str(vpy), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
