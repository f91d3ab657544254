"""Runs an infra/ script with the fake `az` (tests/fakes/az) first on PATH: the script's real
logic runs unchanged against a small tenant held in a JSON file, and every call it makes is
recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
FAKES = Path(__file__).resolve().parent
# Calls that change a tenant; everything else the scripts call only reads.
_CHANGES = (
    ["rest", "--method", "POST"],
    ["ad", "app", "create"],
    ["ad", "app", "update"],
    ["ad", "app", "permission", "add"],
    ["ad", "app", "federated-credential", "create"],
    ["ad", "app", "federated-credential", "delete"],
    ["ad", "sp", "create"],
)


@dataclass
class Run:
    code: int
    out: str
    err: str
    calls: list[list[str]]

    def posts(self) -> list[dict[str, Any]]:
        """The bodies of the app role assignments made (az rest POST)."""
        return [
            json.loads(c[c.index("--body") + 1]) for c in self.calls if c[:3] == ["rest", "--method", "POST"]
        ]

    def changes(self) -> list[list[str]]:
        return [c for c in self.calls if any(c[: len(prefix)] == prefix for prefix in _CHANGES)]

    def queries(self) -> list[str]:
        return [c[c.index("--query") + 1] for c in self.calls if "--query" in c]


class FakeAz:
    """A tenant for the fake az; `state` may be edited between runs (then `save()`)."""

    def __init__(self, directory: Path, state: dict[str, Any]) -> None:
        self.state_path = directory / "tenant.json"
        self.log_path = directory / "az-calls.jsonl"
        self.state = state
        self.save()

    def save(self) -> None:
        self.state_path.write_text(json.dumps(self.state))

    def load(self) -> dict[str, Any]:
        """The tenant as the last run left it."""
        self.state = json.loads(self.state_path.read_text())
        return self.state

    def run(self, script: str, *args: str) -> Run:
        self.log_path.write_text("")
        # The fake runs with `env python3`: this interpreter's directory next, so each of the
        # dozen az calls a script makes starts Python directly rather than through a version shim.
        path = os.pathsep.join([str(FAKES), str(Path(sys.executable).parent), os.environ["PATH"]])
        env = {
            **os.environ,
            "PATH": path,
            "FAKE_AZ_STATE": str(self.state_path),
            "FAKE_AZ_LOG": str(self.log_path),
        }
        done = subprocess.run(
            [str(ROOT / "infra" / script), *args], env=env, capture_output=True, text=True, timeout=60
        )
        calls = [json.loads(line) for line in self.log_path.read_text().splitlines()]
        self.load()
        return Run(done.returncode, done.stdout, done.stderr, calls)
