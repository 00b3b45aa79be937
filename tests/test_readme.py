"""README's Python snippets run exactly as written, from a folder outside the project after `pip install -e .`
(the API one against a live app instead of port 7860), its shell commands name no file a fresh clone lacks, and
its test command is the one CI runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import EXAMPLES, ROOT

README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
ONNX_SNIPPET = "# onnxruntime alone"  # run by tests/test_onnx.py, on an exported model and an aligned crop


def run_snippet(code: str, folder) -> subprocess.CompletedProcess:
    """In a fresh interpreter, in `folder`, with nothing on the path but what is installed: as a user of the
    installed project runs it from a folder of their own photos."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=folder, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)


def test_readme_has_the_snippets_it_promises():
    assert len(SNIPPETS) >= 5
    assert any("face_crops" in snippet and "AutoModel" in snippet for snippet in SNIPPETS)
    assert any(snippet.startswith(ONNX_SNIPPET) for snippet in SNIPPETS)


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_python_snippet_runs_from_another_folder(index, app_url, tmp_path):
    code = SNIPPETS[index].replace("http://127.0.0.1:7860/", app_url)
    if code.startswith(ONNX_SNIPPET):
        pytest.skip("tests/test_onnx.py runs this one on an exported model")
    shutil.copytree(EXAMPLES, tmp_path / "examples")  # the user's own photos, beside them
    result = run_snippet(code, tmp_path)
    assert result.returncode == 0, f"snippet {index} failed:\n{SNIPPETS[index]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr


def test_the_project_is_installed_not_borrowed_from_the_working_folder(tmp_path):
    """`pip install -e .` is what makes the snippets work outside the checkout."""
    result = run_snippet("import faces, modeling, training.train, app; print(faces.DEFAULT_MODEL)", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(ROOT / "model")


def test_readme_commands_name_only_what_a_fresh_clone_has():
    """No stale `runs/...` folder as an input: runs/ is made by training, never committed, so a command may read
    only a run that a command before it in the README writes."""
    written: set[str] = set()
    for command in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL):
        for flag in ("--model", "--init_from", "--distill_from", "--seed_model"):
            for value in re.findall(rf"{flag} (\S+)", command):
                assert not value.startswith("runs/") or value in written, f"{flag} {value}"
        written.update(re.findall(r"--output_dir (\S+)", command))


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = "pip install -e . -r requirements-dev.txt && HF_HUB_OFFLINE=1 python -m pytest"
    assert command in README and command in ci


def test_readme_speaks_to_users_not_of_how_the_project_was_made():
    for path in [ROOT / "README.md", ROOT / "model" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text().lower()
        assert not re.search(r"\bsessions?\b", text), path  # (onnxruntime's InferenceSession is no session)
        assert not re.search(r"\bthe issue\b|issue \d+", text), path


def test_pyproject_dependencies_are_requirements_txt():
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert declared == listed
