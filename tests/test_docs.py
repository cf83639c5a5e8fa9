import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_config_reference_matches_schema():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"])
    assert r.returncode == 0, "README's config reference is stale: run python scripts/config_reference.py"


def test_readme_states_two_setup_commands_that_ci_uses():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/install.sh && .venv/bin/hierfedlora run configs/fedlora.toml" in readme
    assert "bash scripts/install.sh && .venv/bin/python -m pytest -q" in readme
    assert "bash scripts/install.sh" in ci and ".venv/bin/python -m pytest -q" in ci
