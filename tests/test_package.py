"""The deployable zip holds exactly the app: what .funcignore lets through, nothing else."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from localdev.package import build

ROOT = Path(__file__).resolve().parent.parent
# The OpenAPI document is served by the app (GET /api/openapi.json), so it ships with it.
APP_FILES = {"function_app.py", "host.json", "requirements.txt", "openapi/offboard.swagger.json"}


def names(zip_path: Path) -> set[str]:
    with zipfile.ZipFile(zip_path) as archive:
        return set(archive.namelist())


def test_the_repository_zip_is_exactly_the_app(tmp_path: Path) -> None:
    (ROOT / "shared" / "__pycache__").mkdir(exist_ok=True)  # as any test run leaves it
    shared = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "shared").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert "shared/settings.py" in shared
    zip_path = tmp_path / "app.zip"
    build(ROOT, zip_path)
    assert names(zip_path) == APP_FILES | shared


def test_everything_but_the_app_is_left_out(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / ".funcignore", project / ".funcignore")
    kept = [
        "function_app.py",
        "host.json",
        "requirements.txt",
        "shared/__init__.py",
        "shared/nested/module.py",
    ]
    left_out = [
        "tests/test_x.py",
        "tests/fakes/az",
        "localdev/host.py",
        "scripts/package",
        "infra/azuredeploy.json",
        "node_modules/azurite/index.js",
        ".venv/lib/python3.11/site-packages/x.py",
        ".venv-infra/bin/checkov",
        "shared/__pycache__/settings.cpython-311.pyc",
        "shared/stray.pyc",
        ".pytest_cache/v/cache",
        "dist/offboard-app.zip",
        ".git/config",
        ".gitignore",
        ".ci/run",
        "local.settings.json",
        "local.settings.sample.json",
        "requirements-dev.txt",
        "requirements-infra.txt",
        "pyproject.toml",
        "package.json",
        "README.md",
        "__azurite_db_queue__.json",
    ]
    for path in kept + left_out:
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_text(path)
    zip_path = project / "dist" / "offboard-app.zip"
    files = build(project, zip_path)
    assert files == sorted(kept)
    assert names(zip_path) == set(kept)
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.read("shared/nested/module.py") == b"shared/nested/module.py"


def test_the_zip_is_reproducible(tmp_path: Path) -> None:
    build(ROOT, tmp_path / "one.zip")
    build(ROOT, tmp_path / "two.zip")
    assert (tmp_path / "one.zip").read_bytes() == (tmp_path / "two.zip").read_bytes()
