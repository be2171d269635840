"""The documentation site builds offline in strict mode with no warning: every page is in the
nav, every link and anchor between pages resolves, and the API page renders from the
docstrings. What `make docs` runs, into a temporary folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# the site's packages come with the dev (and docs) extras; without them there is nothing to build
pytest.importorskip("mkdocs")
pytest.importorskip("material")
pytest.importorskip("mkdocstrings")


def test_the_site_builds_strict_without_warnings(tmp_path):
    # the banner mkdocs-material prints about MkDocs 2 is not about this site
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
         "-d", str(tmp_path / "site")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "index.html").is_file()
