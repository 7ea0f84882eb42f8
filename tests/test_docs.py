"""The front door stays short and true: README under 15 KB, its links resolve, its test command is what CI
runs, and the reference pages generated from the code (docs/generate.py) are current."""
from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def test_the_generated_reference_pages_are_current():
    out = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_the_readme_is_short_and_every_link_resolves():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 15_000
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), target
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), (page.name, target)


def test_the_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1].strip() == "make test"


def test_the_docs_carry_no_dated_measurements():
    """Dated figures belong in benchmarks/README.md (they are true of their day), not in the docs' prose."""
    for page in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        dated = re.findall(r"\b20\d\d-\d\d-\d\d\b", page.read_text())
        assert not dated, (page.name, dated)
