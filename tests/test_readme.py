"""README's Python snippets run exactly as written (the API one against a live app instead of port 7860), and
its test command is the one CI runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def run_snippet(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_readme_has_the_snippets_it_promises():
    assert len(SNIPPETS) >= 4
    assert any("face_crops" in snippet and "AutoModel" in snippet for snippet in SNIPPETS)


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_python_snippet_runs(index, app_url, tmp_path):
    code = SNIPPETS[index].replace("http://127.0.0.1:7860/", app_url)
    if "labelled.png" in code:  # keep the written file out of the project
        code = code.replace('"labelled.png"', repr(str(tmp_path / "labelled.png")))
    result = run_snippet(code, tmp_path)
    assert result.returncode == 0, f"snippet {index} failed:\n{SNIPPETS[index]}\n{result.stderr[-3000:]}"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = "pip install -r requirements.txt -r requirements-dev.txt && HF_HUB_OFFLINE=1 python -m pytest"
    assert command in README and command in ci
