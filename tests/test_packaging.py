"""Every source file the package, configs and tests need must be committable.

A broad ``.gitignore`` pattern (``data/``) once hid ``src/genbounds/data/`` from git: the
package worked in the working tree and failed to import on a clean clone. This test asks git
itself which of the project's files it would ignore.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("src", "configs", "tests", "benchmarks", ".ci")


def _in_git_checkout() -> bool:
    if shutil.which("git") is None:
        return False
    probe = subprocess.run(
        ["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True, text=True
    )
    return probe.returncode == 0 and probe.stdout.strip() == "true"


@pytest.mark.skipif(not _in_git_checkout(), reason="needs a git checkout of the project")
def test_no_needed_source_file_is_gitignored():
    candidates = [
        p.relative_to(ROOT).as_posix()
        for folder in NEEDED
        if (ROOT / folder).exists()
        for p in (ROOT / folder).rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and ".egg-info" not in p.as_posix()
        and p.suffix in {".py", ".yaml", ".yml", ".toml", ""}
    ]
    assert candidates, "found no project files to check"
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"],
        cwd=ROOT,
        input="\n".join(candidates),
        capture_output=True,
        text=True,
    )
    ignored = [line for line in result.stdout.splitlines() if line.strip()]
    assert not ignored, f".gitignore hides files the project needs: {ignored}"


def test_every_subpackage_is_importable():
    import importlib
    import pkgutil

    import genbounds

    names = [m.name for m in pkgutil.walk_packages(genbounds.__path__, prefix="genbounds.")]
    for expected in ("genbounds.data", "genbounds.models", "genbounds.callbacks",
                     "genbounds.estimators", "genbounds.bounds", "genbounds.reporting"):
        assert expected in names
    for name in names:
        if name.endswith(".__main__"):  # importing it runs the CLI
            continue
        importlib.import_module(name)
