"""The wheel a user installs holds what the checkout has: every package, the bundled weights and cards, py.typed,
the licence, and the single-sourced version (a package missing from pyproject would pass every other test in a
checkout and break the installed package)."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("nha_plugin-*.whl")
    return path


def test_wheel_holds_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "nha_plugin").rglob("*.py")}
    modules |= {"nha_plugin/adapters/" + str(p.relative_to(ROOT / "adapters")) for p in (ROOT / "adapters").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    data = {f"nha_plugin/zoo/{p.name}" for p in (ROOT / "nha_plugin/zoo").iterdir() if p.suffix in (".json", ".md",
                                                                                                  ".safetensors")}
    assert data and data <= names, sorted(data - names)
    assert "nha_plugin/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)


def test_wheel_version_is_the_package_version(wheel):
    from nha_plugin.version import __version__
    assert wheel.name.startswith(f"nha_plugin-{__version__}-")
