"""The settings `scripts/run-local` gives the app, in layers, and their validation.

Lowest to highest precedence:
1. `local.settings.sample.json` (`Values`): every setting, with safe local values;
2. the demo's own pace (`DEMO_DEFAULTS`): retries and status checks in seconds, not minutes,
   and the fleet's `Tier0` tag protected, so the samples finish while you watch;
3. `local.settings.json` (`Values`) at the repo root, when present: your own settings, as
   Functions Core Tools would read them (git-ignored, never deployed);
4. the process environment;
5. the loopback wiring, which must win or nothing would reach the local fakes:
   `AzureWebJobsStorage` (Azurite; any `AzureWebJobsStorage__*` identity-form setting is
   dropped, as it would contradict the connection string), `IDENTITY_ENDPOINT` and
   `IDENTITY_HEADER` (the managed-identity endpoint), `DEFENDER_API_BASE_URL` and
   `GRAPH_API_BASE_URL` (the simulators).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from shared.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
DEMO_DEFAULTS = {
    "OFFBOARD_RETRY_BASE_SECONDS": "2",
    # Follow the simulated action every second or two instead of every minute.
    "OFFBOARD_CHECK_INITIAL_SECONDS": "1",
    "OFFBOARD_CHECK_MAX_SECONDS": "2",
    "OFFBOARD_PROTECTED_TAGS": "Tier0",
    # The Intune watcher reads the Graph simulator every ten seconds and offboards what an
    # administrator retires, wipes or deletes there (the samples retire one device).
    "INTUNE_WATCH_ENABLED": "true",
    "INTUNE_WATCH_MODE": "offboard",
    "INTUNE_WATCH_SCHEDULE": "*/10 * * * * *",
}
_STORAGE_IDENTITY_FORM = "AzureWebJobsStorage__"
# Stands in for the wiring's URLs when the settings are checked before anything has started.
_PLACEHOLDER_WIRING = {
    "DEFENDER_API_BASE_URL": "http://127.0.0.1:1",
    "GRAPH_API_BASE_URL": "http://127.0.0.1:1",
}


def read_values(path: Path) -> dict[str, str]:
    """The `Values` of a local.settings file; SettingsError naming the file and what is wrong."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SettingsError([f"{path.name}: not valid JSON ({exc.msg} at line {exc.lineno})"]) from exc
    except OSError as exc:
        raise SettingsError([f"{path.name}: cannot be read ({exc.strerror})"]) from exc
    values = document.get("Values", {}) if isinstance(document, dict) else None
    if not isinstance(values, dict):
        raise SettingsError([f"{path.name}: 'Values' must be an object of setting names and values"])
    wrong = sorted(name for name, value in values.items() if not isinstance(value, str))
    if wrong:
        # Functions Core Tools takes strings only; say which, rather than guess a conversion.
        raise SettingsError([f"{path.name}: Values.{name} must be a string" for name in wrong])
    return dict(values)


def layered(root: Path = ROOT, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Layers 1 to 4 (sample, demo pace, local.settings.json, environment)."""
    env = {**read_values(root / "local.settings.sample.json"), **DEMO_DEFAULTS}
    own = root / "local.settings.json"
    if own.exists():
        env.update(read_values(own))
    env.update(os.environ if environ is None else environ)
    return env


def wired(env: Mapping[str, str], wiring: Mapping[str, str]) -> dict[str, str]:
    """Layer 5: `env` with the loopback wiring on top."""
    kept = {k: v for k, v in env.items() if not k.startswith(_STORAGE_IDENTITY_FORM)}
    return {**kept, **wiring}


def validate(env: Mapping[str, str], connection_string: str) -> None:
    """Checks the settings the app will get with the app's own `Settings.from_env`, before
    anything starts (the wiring's URLs are not known yet: loopback placeholders stand in)."""
    Settings.from_env(wired(env, {**_PLACEHOLDER_WIRING, "AzureWebJobsStorage": connection_string}))
