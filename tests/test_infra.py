"""Consistency of infra/azuredeploy.json with the app: no checkov, no Azure, just the template.

The app settings the template writes are evaluated (a small evaluator for the few ARM
functions they use) and fed to the app's own `Settings.from_env`, so a template default that
drifts from the app's contract fails here rather than in a customer's subscription.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shared.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_PATH = ROOT / "infra" / "azuredeploy.json"
README = (ROOT / "README.md").read_text()
TEMPLATE: dict[str, Any] = json.loads(TEMPLATE_PATH.read_text())
SAMPLE: dict[str, str] = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
PARAMETERS: dict[str, Any] = TEMPLATE["parameters"]
VARIABLES: dict[str, Any] = TEMPLATE["variables"]
INSIGHTS_CONNECTION = "<from the Application Insights resource>"
# What reference() answers for the app's own identity and the user-assigned one.
SYSTEM_PRINCIPAL = "00000000-0000-4000-8000-00000000a991"
IDENTITY_PRINCIPAL = "00000000-0000-4000-8000-0000000011a1"
IDENTITY_CLIENT = "00000000-0000-4000-8000-00000000c11e"
CUSTOMER_TENANT = "72f988bf-0000-4000-8000-0000000000c1"
MULTITENANT_APP = "3c1f0000-0000-4000-8000-0000000000a9"
COMMERCIAL_DEFENDER_SCOPE = "https://api.securitycenter.microsoft.com/.default"
# Per Defender cloud: the Graph host, AZURE_AUTHORITY_HOST (None: global sign-in, not set) and
# the audience of the managed identity's assertion for workload identity federation.
_GLOBAL = ("graph.microsoft.com", None, "api://AzureADTokenExchange")
GRAPH_AND_SIGN_IN = {
    **dict.fromkeys(
        ["Commercial", "CommercialUS", "CommercialEU", "CommercialUK", "CommercialAU", "GCC"], _GLOBAL
    ),
    **dict.fromkeys(
        [
            *("Security", "SecurityUS", "SecurityEU", "SecurityUK", "SecurityAU"),
            *("SecuritySWA", "SecurityINA", "SecurityAEA"),
        ],
        _GLOBAL,
    ),
    "GCCHigh": ("graph.microsoft.us", "https://login.microsoftonline.us", "api://AzureADTokenExchangeUSGov"),
    "DoD": ("dod-graph.microsoft.us", "https://login.microsoftonline.us", "api://AzureADTokenExchangeUSGov"),
}
STORAGE_ROLES = {
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",  # Storage Blob Data Owner: host leases, deployment package
    "974c5e8b-45b9-4653-ba55-5f855dd0fb88",  # Storage Queue Data Contributor: the work and poison queues
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",  # Storage Table Data Contributor: request state
}


class _Object(dict[str, Any]):
    """An ARM object: `variables('defender').baseUrl` reads a key."""

    def __getattr__(self, name: str) -> Any:
        return self[name]


def _wrap(value: Any) -> Any:
    return _Object({k: _wrap(v) for k, v in value.items()}) if isinstance(value, dict) else value


def _reference(resource_id: str, *_: Any) -> _Object:
    """reference(): the properties the template reads from the resources it creates."""
    if "Microsoft.ManagedIdentity/userAssignedIdentities" in resource_id:
        return _Object(principalId=IDENTITY_PRINCIPAL, clientId=IDENTITY_CLIENT)
    if "Microsoft.Web/sites" in resource_id:
        return _Object(
            identity=_Object(principalId=SYSTEM_PRINCIPAL), defaultHostName="app.azurewebsites.net"
        )
    return _Object(ConnectionString=INSIGHTS_CONNECTION)


def evaluate(value: Any, overrides: dict[str, Any] | None = None) -> Any:
    """Evaluates a template value the way ARM would, for the functions the app settings use."""
    given = overrides or {}

    def parameter(name: str) -> Any:
        return given[name] if name in given else run(PARAMETERS[name].get("defaultValue"))

    def variable(name: str) -> Any:
        return _wrap(run(VARIABLES[name]))

    names = {
        "parameters": parameter,
        "variables": variable,
        "if_": lambda condition, then, otherwise: then if condition else otherwise,
        "or_": lambda *values: any(values),
        "and_": lambda *values: all(values),
        "not_": lambda value: not value,
        "empty": lambda value: value is None or len(value) == 0,
        "null": lambda: None,
        "min": min,
        "concat": lambda *parts: "".join(str(p) for p in parts),
        "string": str,
        "equals": lambda a, b: a == b,
        "environment": lambda: SimpleNamespace(suffixes=SimpleNamespace(storage="core.windows.net")),
        "uniqueString": lambda *_: "x7k2q9",
        "resourceGroup": lambda: SimpleNamespace(id="/subscriptions/0/resourceGroups/rg", location="eastus"),
        "resourceId": lambda *parts: "/".join(parts),
        "reference": _reference,
        "createObject": lambda *pairs: _Object(zip(pairs[::2], pairs[1::2], strict=True)),
        "union": lambda *objects: _Object(kv for obj in objects for kv in obj.items()),
        "items": lambda obj: [_Object(key=k, value=v) for k, v in sorted(obj.items())],
        "map": lambda values, function: [function(v) for v in values],
    }

    def run(raw: Any) -> Any:
        if isinstance(raw, dict):
            return {k: run(v) for k, v in raw.items()}
        if not (isinstance(raw, str) and raw.startswith("[") and raw.endswith("]")):
            return raw
        # ARM expressions are Python expressions once their functions are defined (`if`, `or`,
        # `and` and `not` are Python keywords, so they are renamed; an ARM lambda becomes a Python one).
        expression = re.sub(r"\b(if|or|and|not)\(", r"\1_(", raw[1:-1])
        expression = re.sub(r"\blambda\('(\w+)', ", r"(lambda \1: ", expression)
        expression = re.sub(r"\blambdaVariables\('(\w+)'\)", r"\1", expression)
        return eval(expression, {"__builtins__": {}, **names})  # noqa: S307 - our own template, fixed names

    return run(value)


def template_app_settings(**overrides: Any) -> dict[str, str]:
    """The app settings a deployment gets, for the given parameters (defaults otherwise),
    evaluated from the function app's own `siteConfig.appSettings` expression."""
    (site,) = resources("Microsoft.Web/sites")
    settings = evaluate(site["properties"]["siteConfig"]["appSettings"], overrides)
    names = [setting["name"] for setting in settings]
    assert len(names) == len(set(names)), "an app setting is set twice"
    return {setting["name"]: str(setting["value"]) for setting in settings}


def resources(kind: str) -> list[dict[str, Any]]:
    return [r for r in TEMPLATE["resources"] if r["type"] == kind]


def test_template_is_an_arm_deployment_template() -> None:
    assert TEMPLATE["$schema"].endswith("/deploymentTemplate.json#")


EXAMPLES = sorted((ROOT / "infra").glob("azuredeploy.parameters*.example.json"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_parameters_give_settings_the_app_accepts(path: Path) -> None:
    example = json.loads(path.read_text())
    assert example["$schema"].endswith("/deploymentParameters.json#")
    assert set(example["parameters"]) <= set(PARAMETERS), "the example sets parameters the template lacks"
    given = {name: p["value"] for name, p in example["parameters"].items()}
    Settings.from_env(template_app_settings(**given))


def test_the_examples_are_found() -> None:
    names = {p.name for p in EXAMPLES}
    assert {
        "azuredeploy.parameters.example.json",
        "azuredeploy.parameters.many-tenants.example.json",
    } <= names


@pytest.mark.parametrize(("kind", "defined"), [("parameters", PARAMETERS), ("variables", VARIABLES)])
def test_every_parameter_and_variable_is_used(kind: str, defined: dict[str, Any]) -> None:
    text = TEMPLATE_PATH.read_text()
    used = set(re.findall(rf"\b{kind}\('([^']+)'\)", text))
    assert sorted(set(defined) - used) == [], f"unused {kind}"
    assert sorted(used - set(defined)) == [], f"undefined {kind}"


def test_every_sample_setting_is_set_by_the_template() -> None:
    flex, consumption = template_app_settings(), template_app_settings(hostingPlan="Consumption")
    for name in SAMPLE:
        if name == "AzureWebJobsStorage":
            # Set in its identity-based form: no connection string, no key.
            assert "AzureWebJobsStorage__queueServiceUri" in flex and "AzureWebJobsStorage" not in flex
        elif name == "FUNCTIONS_WORKER_RUNTIME":
            # Flex Consumption refuses this setting: its runtime is part of functionAppConfig.
            assert evaluate(VARIABLES["flexAppConfig"])["runtime"] == {"name": "python", "version": "3.11"}
            assert consumption[name] == SAMPLE[name]
        else:
            assert name in flex and name in consumption, f"{name} is not set by the template"


# App settings the docs name that the template deliberately does not write, and why.
NOT_SET_BY_THE_TEMPLATE = {
    "AzureWebJobsStorage": "the template uses the identity form (no connection string, no key)",
    "AzureWebJobsStorage__accountName": "the template gives the service URIs, right in every cloud",
    "AzureWebJobsStorage__clientId": "storage uses the system-assigned identity",
    "WEBSITE_HOSTNAME": "set by the platform (read-only): the app only reads it",
    "WEBSITE_AUTH_ENABLED": "set by the platform when App Service authentication is on",
}
SETTINGS_DOC = ROOT / "docs" / "settings.md"
# The heading of docs/settings.md's one section whose table is never deployed (scripts/run-local).
LOCAL_ONLY = "Local only"
_SETTING_NAME = r"[A-Za-z][A-Za-z0-9_]*"


def sections(text: str) -> list[tuple[str, str]]:
    """Each `## ` section of a markdown page: its heading and its body, up to the next `## `."""
    return re.findall(r"^## ([^\n]+)\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)


def first_cell_names(body: str) -> set[str]:
    """The backticked names in the first cell of each table row. A name with a placeholder,
    such as `OFFBOARD_PROTECTED_TAGS__<tenantId>`, is per tenant and does not match."""
    names: set[str] = set()
    for line in body.splitlines():
        if line.startswith("|") and not re.match(r"\|\s*:?-", line):
            names |= set(re.findall(rf"`({_SETTING_NAME})`", line.split("|")[1]))
    return names


def settings_the_docs_ask_for(settings_doc: str, pages: list[str]) -> set[str]:
    """Every app setting the docs ask operators to set:

    - each name in the first cell of a table row of docs/settings.md, except in its one
      section headed `## Local only...` (what scripts/run-local sets), and
    - in any page, a backticked name followed by the words "app setting", as in the README's
      "set the Python worker's `PYTHON_THREADPOOL_THREAD_COUNT` app setting to `32`".
    """
    found = sections(settings_doc)
    local = [heading for heading, _ in found if heading.startswith(LOCAL_ONLY)]
    assert len(local) == 1, f"docs/settings.md must have one '## {LOCAL_ONLY}...' section, has {len(local)}"
    names: set[str] = set()
    for heading, body in found:
        if not heading.startswith(LOCAL_ONLY):
            names |= first_cell_names(body)
    for page in pages:
        flowing = " ".join(page.split())
        names |= set(re.findall(rf"`({_SETTING_NAME})` app settings?\b", flowing))
    return names


def every_setting_the_template_can_write() -> set[str]:
    written: set[str] = set()
    for cloud in PARAMETERS["defenderCloud"]["allowedValues"]:
        for plan in PARAMETERS["hostingPlan"]["allowedValues"]:
            written |= set(template_app_settings(defenderCloud=cloud, hostingPlan=plan))
    return written


# One setting from each table of docs/settings.md, and the README's host.json phrase.
_ONE_OF_EACH_TABLE = {
    "OFFBOARD_QUEUE_NAME",
    "DEFENDER_API_BASE_URL",
    "OFFBOARD_TENANTS",
    "OFFBOARD_MAX_ATTEMPTS",
    "OFFBOARD_PROTECTED_TAGS",
    "OFFBOARD_APPROVAL",
    "DEFENDER_OFFBOARD_RATE_LIMITS",
    "INTUNE_WATCH_SCHEDULE",
    "OFFBOARD_PUBLIC_BASE_URL",
    "OFFBOARD_SDK_LOG_LEVEL",
    "AzureWebJobsFeatureFlags",
    "PYTHON_THREADPOOL_THREAD_COUNT",
}


def test_every_setting_the_docs_ask_for_is_set_by_the_template() -> None:
    pages = [README, *(page.read_text() for page in sorted((ROOT / "docs").glob("*.md")))]
    asked = settings_the_docs_ask_for(SETTINGS_DOC.read_text(), pages)
    # A renamed section or a reformatted table must fail here, not pass with nothing to check.
    assert len(asked) >= 60, f"only {len(asked)} settings found in the docs"
    assert sorted(_ONE_OF_EACH_TABLE - asked) == [], "a table of docs/settings.md is no longer read"
    missing = asked - every_setting_the_template_can_write() - set(NOT_SET_BY_THE_TEMPLATE)
    assert sorted(missing) == [], "the docs ask for app settings the template never writes"
    assert set(NOT_SET_BY_THE_TEMPLATE) <= asked, "an exception the docs no longer mention"


def test_the_docs_reader_skips_what_it_should() -> None:
    doc = (
        "## Guardrails\n\n| name | default | meaning |\n|---|---|---|\n"
        "| `OFFBOARD_DENY_LIST` | empty | ... |\n| `OFFBOARD_PROTECTED_TAGS__<tenantId>` | unset | ... |\n"
        "## Local only: what scripts/run-local sets\n\n| local only | value | why |\n|---|---|---|\n"
        "| `IDENTITY_ENDPOINT`, `IDENTITY_HEADER` | loopback | ... |\n"
    )
    page = "set the `PYTHON_THREADPOOL_THREAD_COUNT`\napp setting; the `WEBSITE_HOSTNAME` host name"
    assert settings_the_docs_ask_for(doc, [page]) == {"OFFBOARD_DENY_LIST", "PYTHON_THREADPOOL_THREAD_COUNT"}
    with pytest.raises(AssertionError, match="one '## Local only"):
        settings_the_docs_ask_for(doc.replace("## Local only", "## Locally"), [])


@pytest.mark.parametrize("enabled", [False, True])
@pytest.mark.parametrize("plan", PARAMETERS["hostingPlan"]["allowedValues"])
def test_the_watcher_schedule_is_always_written(enabled: bool, plan: str) -> None:
    # The timer trigger reads %INTUNE_WATCH_SCHEDULE%: without the setting the host cannot index
    # the app at all, so it is written with the watcher off too.
    deployed = template_app_settings(intuneWatchEnabled=enabled, hostingPlan=plan)
    assert deployed["INTUNE_WATCH_SCHEDULE"] == "0 */5 * * * *"
    assert deployed["INTUNE_WATCH_ENABLED"] == ("true" if enabled else "false")
    assert Settings.from_env(deployed).intune_watch_enabled is enabled
    assert PARAMETERS["intuneWatchSchedule"]["minLength"] >= len("* * * * * *")


def test_flex_consumption_gets_none_of_the_settings_it_refuses() -> None:
    # functionAppConfig replaces these on Flex Consumption; set anyway, they break the app.
    refused = {"FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION", "WEBSITE_RUN_FROM_PACKAGE"}
    assert refused & set(template_app_settings()) == set()
    assert refused <= set(template_app_settings(hostingPlan="Consumption"))


def test_template_defaults_match_the_sample_settings() -> None:
    deployed = template_app_settings()
    for name, value in SAMPLE.items():
        if name in deployed:
            assert deployed[name] == value, name


@pytest.mark.parametrize("plan", PARAMETERS["hostingPlan"]["allowedValues"])
@pytest.mark.parametrize("cloud", PARAMETERS["defenderCloud"]["allowedValues"])
def test_every_cloud_and_plan_gives_settings_the_app_accepts(cloud: str, plan: str) -> None:
    deployed = template_app_settings(defenderCloud=cloud, hostingPlan=plan)
    settings = Settings.from_env(deployed)
    assert settings.storage.uses_identity and settings.storage.client_id is None
    assert settings.storage.queue_service_uri == "https://offboardx7k2q9.queue.core.windows.net"
    # The base URL and the token audience are chosen together, never one without the other.
    host = settings.defender_base_url.removeprefix("https://")
    if cloud.startswith("Commercial"):
        assert settings.defender_scope == COMMERCIAL_DEFENDER_SCOPE
        assert re.fullmatch(r"api(-(us|eu|uk|au))?\.securitycenter\.microsoft\.com", host)
    elif cloud.startswith("Security"):
        # The newer hosts take the same audience (Learn requests api.securitycenter's for them).
        assert settings.defender_scope == COMMERCIAL_DEFENDER_SCOPE
        assert re.fullmatch(r"((us|eu|uk|au|swa|ina|aea)\.)?api\.security\.microsoft\.com", host)
    else:
        # US Government: the audience is not documented; the template uses the API host itself.
        assert settings.defender_scope == f"https://{host}/.default"
        assert host.endswith(".securitycenter.microsoft.us")


@pytest.mark.parametrize("cloud", PARAMETERS["defenderCloud"]["allowedValues"])
def test_every_cloud_signs_in_and_reads_graph_in_its_own_cloud(cloud: str) -> None:
    deployed = template_app_settings(defenderCloud=cloud)
    settings = Settings.from_env(deployed)
    graph, sign_in, audience = GRAPH_AND_SIGN_IN[cloud]
    assert settings.graph_base_url == f"https://{graph}"
    # The .default scope names the Graph root's own domain (Graph national cloud deployments).
    assert settings.graph_scope == f"https://{graph}/.default"
    assert settings.token_exchange_audience == audience
    # azure-identity reads AZURE_AUTHORITY_HOST for the customer-tenant client assertion; an
    # empty value would make it https:// and break sign-in, so global clouds do not set it.
    assert deployed.get("AZURE_AUTHORITY_HOST") == sign_in


def test_allowed_values_match_what_the_template_maps() -> None:
    assert set(PARAMETERS["defenderCloud"]["allowedValues"]) == set(VARIABLES["defenderClouds"])
    assert set(PARAMETERS["defenderCloud"]["allowedValues"]) == set(GRAPH_AND_SIGN_IN)
    assert {c["entraCloud"] for c in VARIABLES["defenderClouds"].values()} == set(VARIABLES["entraClouds"])
    assert PARAMETERS["hostingPlan"]["allowedValues"] == ["FlexConsumption", "Consumption"]


@pytest.mark.parametrize(
    ("parameter", "setting"),
    [
        ("maxAttempts", "OFFBOARD_MAX_ATTEMPTS"),
        ("retryBaseSeconds", "OFFBOARD_RETRY_BASE_SECONDS"),
        ("retryMaxSeconds", "OFFBOARD_RETRY_MAX_SECONDS"),
        ("configRetrySeconds", "OFFBOARD_CONFIG_RETRY_SECONDS"),
        ("connectTimeoutSeconds", "DEFENDER_CONNECT_TIMEOUT_SECONDS"),
        ("readTimeoutSeconds", "DEFENDER_READ_TIMEOUT_SECONDS"),
        ("queueName", "OFFBOARD_QUEUE_NAME"),
        ("operatorRole", "OFFBOARD_OPERATOR_ROLE"),
    ],
)
def test_parameter_bounds_are_values_the_app_accepts(parameter: str, setting: str) -> None:
    spec = PARAMETERS[parameter]
    if spec["type"] == "int":
        extremes = [spec["minValue"], spec["maxValue"]]
    else:
        extremes = ["q" * spec["minLength"], "q" * spec["maxLength"]]
    for value in extremes:
        deployed = template_app_settings(**{parameter: value})
        assert deployed[setting] == str(value)
        Settings.from_env(deployed)  # raises on a value the app would refuse at start-up


def test_no_keys_or_secrets_anywhere() -> None:
    text = TEMPLATE_PATH.read_text()
    for forbidden in ("listKeys", "listkeys", "AccountKey", "InstrumentationKey", "SharedAccessSignature"):
        assert forbidden not in text
    (account,) = resources("Microsoft.Storage/storageAccounts")
    props = account["properties"]
    assert props["allowSharedKeyAccess"] is False and props["allowBlobPublicAccess"] is False
    assert props["supportsHttpsTrafficOnly"] is True and props["minimumTlsVersion"] == "TLS1_2"
    assert account["kind"] == "StorageV2"
    (insights,) = resources("Microsoft.Insights/components")
    assert insights["properties"]["DisableLocalAuth"] is True
    assert "WorkspaceResourceId" in insights["properties"]


def test_function_app_is_locked_down() -> None:
    (site,) = resources("Microsoft.Web/sites")
    assert site["kind"] == "functionapp,linux"
    assert evaluate(site["identity"]) == {"type": "SystemAssigned", "userAssignedIdentities": None}
    config = site["properties"]["siteConfig"]
    assert site["properties"]["httpsOnly"] is True
    assert config["ftpsState"] == "Disabled" and config["minTlsVersion"] == "1.2"
    assert {
        p["name"].rsplit("/", 1)[-1].rstrip("')]")
        for p in resources("Microsoft.Web/sites/basicPublishingCredentialsPolicies")
    } == {"ftp", "scm"}
    assert evaluate(config["linuxFxVersion"], {"hostingPlan": "Consumption"}) == "Python|3.11"


def test_storage_roles_are_granted_on_that_account_only() -> None:
    assignments = resources("Microsoft.Authorization/roleAssignments")
    storage = [a for a in assignments if "storageAccounts" in a["scope"]]
    assert len(storage) == 1 and storage[0]["copy"]["count"].startswith(
        "[length(items(variables('storageRoles')"
    )
    assert set(VARIABLES["storageRoles"].values()) == STORAGE_ROLES
    assert evaluate(storage[0]["scope"]) == "Microsoft.Storage/storageAccounts/offboardx7k2q9"
    for assignment in assignments:
        assert assignment["properties"]["principalType"] == "ServicePrincipal"
        # Storage and telemetry stay with the system-assigned identity, whatever else is attached.
        principal = assignment["properties"]["principalId"]
        assert "identity.principalId" in principal and "userAssignedIdentities" not in principal
        assert evaluate(principal, {"userAssignedIdentity": True}) == SYSTEM_PRINCIPAL


def outputs(**overrides: Any) -> dict[str, Any]:
    return {name: evaluate(output["value"], overrides) for name, output in TEMPLATE["outputs"].items()}


def test_outputs_name_the_identity_and_the_host() -> None:
    assert "defaultHostName" in TEMPLATE["outputs"]["functionAppHostName"]["value"]
    plain = outputs()
    assert plain["principalId"] == plain["apiPrincipalId"] == SYSTEM_PRINCIPAL
    assert plain["userAssignedIdentityPrincipalId"] == plain["userAssignedIdentityClientId"] == ""
    # With the user-assigned identity, that is the one to grant Defender and Graph roles to.
    created = outputs(userAssignedIdentity=True)
    assert created["principalId"] == SYSTEM_PRINCIPAL
    assert created["apiPrincipalId"] == created["userAssignedIdentityPrincipalId"] == IDENTITY_PRINCIPAL
    assert created["userAssignedIdentityClientId"] == IDENTITY_CLIENT


def identity_resource() -> dict[str, Any]:
    (identity,) = resources("Microsoft.ManagedIdentity/userAssignedIdentities")
    return identity


def test_no_user_assigned_identity_unless_asked() -> None:
    assert evaluate(identity_resource()["condition"]) is False
    deployed = template_app_settings()
    assert deployed["MANAGED_IDENTITY_CLIENT_ID"] == ""
    assert Settings.from_env(deployed).managed_identity_client_id is None
    # An identity the operator attached by hand is still named through managedIdentityClientId.
    assert (
        template_app_settings(managedIdentityClientId="c0ffee00-0000-4000-8000-000000000001")[
            "MANAGED_IDENTITY_CLIENT_ID"
        ]
        == "c0ffee00-0000-4000-8000-000000000001"
    )


@pytest.mark.parametrize("plan", PARAMETERS["hostingPlan"]["allowedValues"])
def test_user_assigned_identity_is_created_attached_and_calls_defender_and_graph(plan: str) -> None:
    given = {"userAssignedIdentity": True, "hostingPlan": plan}
    identity = identity_resource()
    assert evaluate(identity["condition"], given) is True
    assert evaluate(identity["name"], given) == "offboard-x7k2q9-identity"
    (site,) = resources("Microsoft.Web/sites")
    identity_id = evaluate("[variables('identityId')]", given)
    assert evaluate(site["identity"], given) == {
        "type": "SystemAssigned, UserAssigned",
        "userAssignedIdentities": {identity_id: {}},
    }
    assert "[variables('identityId')]" in site["dependsOn"]
    deployed = template_app_settings(**given)
    settings = Settings.from_env(deployed)
    assert settings.managed_identity_client_id == IDENTITY_CLIENT
    # Everything else keeps the system-assigned identity: storage, telemetry, the package.
    assert settings.storage.client_id is None and "AzureWebJobsStorage__clientId" not in deployed
    assert deployed["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == "Authorization=AAD"
    if plan == "Consumption":
        assert deployed["WEBSITE_RUN_FROM_PACKAGE_BLOB_MI_RESOURCE_ID"] == "SystemAssigned"
    else:
        flex = evaluate(VARIABLES["flexAppConfig"], given)
        assert flex["deployment"]["storage"]["authentication"] == {"type": "SystemAssignedIdentity"}
    # A client id given by hand cannot point the app at another identity than the one attached.
    mixed = template_app_settings(**given, managedIdentityClientId="c0ffee00-0000-4000-8000-000000000001")
    assert mixed["MANAGED_IDENTITY_CLIENT_ID"] == IDENTITY_CLIENT


@pytest.mark.parametrize("cloud", PARAMETERS["defenderCloud"]["allowedValues"])
def test_customer_tenants_bring_their_identity_with_them(cloud: str) -> None:
    # Customer tenants are reached as the multi-tenant app, whose credential is the user-assigned
    # identity: listing tenants creates and attaches it even if userAssignedIdentity was forgotten.
    given = {
        "defenderCloud": cloud,
        "tenants": f"{CUSTOMER_TENANT}=Contoso",
        "multitenantAppClientId": MULTITENANT_APP,
    }
    assert evaluate(identity_resource()["condition"], given) is True
    settings = Settings.from_env(template_app_settings(**given))
    assert [(t.id, t.name) for t in settings.tenants] == [(CUSTOMER_TENANT, "Contoso")]
    assert settings.multitenant_app_client_id == MULTITENANT_APP
    assert settings.managed_identity_client_id == IDENTITY_CLIENT
    assert settings.token_exchange_audience == GRAPH_AND_SIGN_IN[cloud][2]
    assert outputs(**given)["apiPrincipalId"] == IDENTITY_PRINCIPAL


def test_additional_app_settings_survive_a_redeployment_and_win() -> None:
    # A redeployment replaces every app setting: per-tenant protection and a changed token
    # audience must come from the template too, or they vanish at the next deployment.
    changed_scope = "https://api-gov.securitycenter.microsoft.us/api/.default"
    extra = {
        f"OFFBOARD_PROTECTED_TAGS__{CUSTOMER_TENANT.replace('-', '_')}": "Crown-Jewels,VIP",
        "DEFENDER_API_SCOPE": changed_scope,
    }
    deployed = template_app_settings(
        defenderCloud="GCCHigh",
        tenants=CUSTOMER_TENANT,
        multitenantAppClientId=MULTITENANT_APP,
        additionalAppSettings=extra,
    )
    settings = Settings.from_env(deployed)
    assert settings.defender_scope == changed_scope
    (tenant,) = settings.tenants
    assert tenant.protected_tags == ("Crown-Jewels", "VIP")


def test_customer_tenants_without_the_multitenant_app_are_refused_by_name() -> None:
    # The one half the template cannot supply: the app refuses to start, naming the setting,
    # so every request answers 500 ServiceMisconfigured until multitenantAppClientId is given.
    deployed = template_app_settings(tenants=CUSTOMER_TENANT)
    assert deployed["MANAGED_IDENTITY_CLIENT_ID"] == IDENTITY_CLIENT
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(deployed)
    (problem,) = refused.value.problems
    assert "MULTITENANT_APP_CLIENT_ID" in problem and "MANAGED_IDENTITY_CLIENT_ID" not in problem
