"""The sample Sentinel playbook: a valid ARM template whose HTTP call this app understands."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from shared.http.callers import Accepted, Inbound, Items, recognise
from tests.conftest import MACHINE

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK = ROOT / "playbooks" / "sentinel-offboard-incident-hosts.json"


def template() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(PLAYBOOK.read_text())
    return document


def workflow() -> dict[str, Any]:
    [logic_app] = [r for r in template()["resources"] if r["type"] == "Microsoft.Logic/workflows"]
    return logic_app  # type: ignore[no-any-return]


def test_every_template_parameter_is_used_and_the_key_is_secure() -> None:
    text = PLAYBOOK.read_text()
    params = template()["parameters"]
    for name in params:
        assert f"parameters('{name}')" in text, f"template parameter {name} is never used"
    assert params["FunctionKey"]["type"] == "securestring" and "defaultValue" not in params["FunctionKey"]
    assert workflow()["properties"]["definition"]["parameters"]["functionKey"]["type"] == "SecureString"


def test_no_key_or_secret_is_in_the_repository_copy() -> None:
    text = PLAYBOOK.read_text()
    assert not re.search(r"code=[A-Za-z0-9]", text) and "x-functions-key" not in text.lower()
    # Function keys are long base64-ish strings; nothing like one may appear.
    assert not re.search(r"[A-Za-z0-9_\-]{40,}={0,2}", text.replace("Microsoft_Sentinel_incident", ""))


def test_incident_trigger_then_one_post_per_host_with_secure_run_history() -> None:
    definition = workflow()["properties"]["definition"]
    [trigger] = definition["triggers"].values()
    assert trigger["type"] == "ApiConnectionWebhook" and trigger["inputs"]["path"] == "/incident-creation"
    query = definition["actions"]["Host_entities"]
    assert query["type"] == "Query" and "relatedEntities" in query["inputs"]["from"]
    loop = definition["actions"]["For_each_host"]
    assert loop["type"] == "Foreach" and loop["foreach"] == "@body('Host_entities')"
    post = loop["actions"]["Offboard_host"]
    assert post["type"] == "Http" and post["inputs"]["method"] == "POST"
    assert post["inputs"]["queries"] == {"code": "@parameters('functionKey')"}
    assert set(post["runtimeConfiguration"]["secureData"]["properties"]) == {"inputs", "outputs"}


def test_what_the_playbook_posts_is_understood() -> None:
    # Evaluate the loop body the way Logic Apps would, for a host entity of a real incident.
    incident = json.loads((ROOT / "tests" / "payloads" / "sentinel-incident.json").read_text())
    entity = incident["object"]["properties"]["relatedEntities"][0]
    posted = workflow()["properties"]["definition"]["actions"]["For_each_host"]["actions"]["Offboard_host"]
    body = dict(posted["inputs"]["body"])
    assert body["Entities"] == ["@item()"]
    body["Entities"] = [entity]
    body["comment"] = "Sentinel incident 4711: title https://portal.azure.com/#asset/..."
    result = recognise(Inbound.of("POST", json.dumps(body).encode(), {}, {}), "default")
    assert isinstance(result, Items) and result.format == "sentinel-entities"
    [item] = result.items
    assert isinstance(item, Accepted) and item.request.machine_id == MACHINE
    assert item.request.comment.startswith("Sentinel incident 4711")
