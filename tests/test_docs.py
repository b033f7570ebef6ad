"""The documentation cannot rot: the site builds with ``--strict`` and every example marked runnable runs."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# A fenced bash or python block right after the marker line ``<!-- runs -->``.
RUNNABLE = re.compile(r"<!-- runs -->\n```(bash|python)\n(.*?)\n```", re.S)


def runnable_blocks() -> list:
    blocks = []
    for page in sorted(DOCS.rglob("*.md")):
        for i, (lang, code) in enumerate(RUNNABLE.findall(page.read_text())):
            blocks.append(pytest.param(lang, code, id=f"{page.relative_to(DOCS)}#{i}"))
    return blocks


def test_every_task_page_has_a_runnable_example():
    pages = {str(b.id).split("#")[0] for b in runnable_blocks()}
    tasks = {"getting-started.md", "analyze.md", "tempbalance.md", "allocators.md", "finetune.md", "reports.md",
             "scale.md"}
    assert tasks <= pages, tasks - pages


@pytest.mark.parametrize("lang,code", runnable_blocks())
def test_example_runs(lang, code, tmp_path):
    (tmp_path / "sample_checkpoints").symlink_to(ROOT / "sample_checkpoints")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MPLBACKEND": "Agg"}
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is part of the test extra"
    res = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "api" / "index.html").exists()
