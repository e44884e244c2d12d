"""Recipes are found through entry points: multissl's own, and a plug-in package's, run by name."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from multissl.errors import MultiSSLError
from multissl.registry import available, find
from tests.conftest import BIN, ROOT, run

OURS = {"pretrain": ["barlow_twins", "byol", "clip", "clm", "dino", "mae", "mlm", "moco", "rotation", "simclr", "simsiam", "vicreg", "wav2vec2"],
        "finetune": ["audio-classification", "image-classification", "speech-recognition", "text-classification"]}


def test_our_recipes_are_registered_with_their_configs() -> None:
    for kind, names in OURS.items():
        found = available(kind)
        assert [n for n in found if n in names] == names
        for name in names:
            recipe = found[name]
            assert recipe.source == "multissl" and recipe.entry_point.value.startswith("multissl_recipes.")
            assert "tiny.yaml" in recipe.configs()
    assert find("pretrain", "mlm").main.__module__ == "multissl_recipes.mlm"


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(MultiSSLError, match=r"unknown recipe 'mml' \(did you mean 'mlm'\?\); available: barlow_twins, byol, clip, clm"):
        find("pretrain", "mml")


def plugin(root: Path, body: str, name: str = "theirs") -> Path:
    """A tiny installed-looking package: a module plus a dist-info folder with its entry point."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "theirs_recipe.py").write_text(textwrap.dedent(body))
    info = root / "theirs_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: theirs-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[multissl.recipes]\n{name} = theirs_recipe\n")
    return root


def test_a_plugin_package_adds_a_recipe(tmp_path: Path) -> None:
    site = plugin(tmp_path / "site", '''
        """A plug-in recipe: it writes what it was given."""
        import sys
        from pathlib import Path

        DEFAULT_CONFIG = Path(__file__).parent / "theirs_configs" / "tiny.yaml"

        def main(argv=None):
            Path(argv[0].split("=", 1)[1]).write_text("ran with " + " ".join(argv))
    ''')
    (site / "theirs_configs").mkdir()
    (site / "theirs_configs" / "tiny.yaml").write_text("{}\n")
    env = {"PYTHONPATH": f"{site}:{ROOT}"}
    listing = run([str(BIN / "multissl"), "recipes"], **env)
    assert listing.returncode == 0, listing.stderr
    assert "pretrain theirs: tiny.yaml  (from theirs-plugin)" in listing.stdout
    assert "pretrain mlm: base.yaml, roberta_tiny.yaml, small.yaml, tiny.yaml" in listing.stdout
    marker = tmp_path / "ran.txt"
    proc = run([str(BIN / "multissl"), "pretrain", "theirs", f"out={marker}", "x=1"], **env)
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == f"ran with out={marker} x=1"


def test_a_broken_plugin_is_one_line_and_spares_the_others(tmp_path: Path) -> None:
    site = plugin(tmp_path / "site", "raise ImportError('needs a library that is not installed')\n")
    env = {"PYTHONPATH": f"{site}:{ROOT}"}
    proc = run([str(BIN / "multissl"), "pretrain", "theirs"], **env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "multissl: error: recipe 'theirs' (theirs_recipe, from theirs-plugin) cannot be loaded: "
        "ImportError: needs a library that is not installed"]


def test_a_name_declared_twice_is_refused(tmp_path: Path) -> None:
    site = plugin(tmp_path / "site", "def main(argv=None):\n    pass\n", name="mlm")
    code = "from multissl.registry import available; available('pretrain')"
    proc = run([sys.executable, "-c", code], PYTHONPATH=f"{site}:{ROOT}")
    assert proc.returncode != 0
    assert "two installed packages declare the recipe 'mlm'" in proc.stderr


def test_every_package_folder_is_installed() -> None:
    """pyproject lists its packages by hand (recipes/ installs as multissl_recipes): none may be missing."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "multissl").rglob("__init__.py")}
    assert found | {"multissl_recipes"} == listed
