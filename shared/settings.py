"""App settings, read once from the environment into a frozen dataclass.

Every problem is collected and reported together, each with the setting's name, so an
operator fixes a broken deployment in one pass rather than one restart per typo.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, TypeVar
from urllib.parse import urlsplit

from .domain.offboard import comment_problem
from .storage_settings import StorageAccess, StorageSettingsError

DEFAULT_COMMENT = "Offboarded by automation (Defender offboarding service)"
# Queue names: 3-63 chars, lowercase letters, digits and single hyphens (Azure's rule).
_QUEUE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
# Leaves room for the "-poison" suffix the host appends (63 - 7).
_MAX_WORK_QUEUE_NAME = 56
# Table names: 3-63 letters and digits, starting with a letter (Azure's rule).
_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{2,62}")
# Defender's documented limit, per application and tenant, for offboard and for the general
# machine and machine-action APIs alike.
DEFAULT_RATE_LIMITS = "100/60,1500/3600"
# The limiter keeps the last `count` slot times in one table property (64 KiB, 8 bytes each).
_MAX_RATE_COUNT = 5000

T = TypeVar("T")


class RateWindow(NamedTuple):
    """At most `calls` calls in any sliding window of `seconds`."""

    calls: int
    seconds: float


@dataclass(frozen=True)
class Tenant:
    """A customer tenant this deployment may offboard in (OFFBOARD_TENANTS), with its own
    protection where OFFBOARD_PROTECTED_TAGS__<id> / OFFBOARD_PROTECTED_GROUP_IDS__<id> say so
    (<id> with underscores for its hyphens: App Service setting names cannot hold hyphens)."""

    id: str
    name: str | None = None
    protected_tags: tuple[str, ...] | None = None  # None: the deployment's OFFBOARD_PROTECTED_TAGS
    protected_group_ids: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.id})" if self.name else self.id


class SettingsError(ValueError):
    """One or more settings are missing or invalid; the message lists every one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings: " + "; ".join(problems))


@dataclass(frozen=True)
class Settings:
    storage: StorageAccess
    queue_name: str
    defender_base_url: str
    defender_scope: str
    managed_identity_client_id: str | None
    default_comment: str
    max_attempts: int
    retry_base_seconds: float
    retry_max_seconds: float
    config_retry_seconds: float
    connect_timeout_seconds: float
    read_timeout_seconds: float
    state_table_name: str
    audit_table_name: str
    check_initial_seconds: float
    check_max_seconds: float
    check_horizon_seconds: float
    precheck: bool
    precheck_without_permission: str
    protected_tags: tuple[str, ...]
    protected_group_ids: tuple[int, ...]
    deny_list: tuple[str, ...]
    dry_run: bool
    breaker_limit: int
    breaker_window_seconds: float
    hold_expiry_seconds: float
    tag_after_offboard: str | None
    rate_limit_table: str = "offboardratelimits"
    offboard_rate_limits: tuple[RateWindow, ...] = (RateWindow(100, 60.0), RateWindow(1500, 3600.0))
    machine_read_rate_limits: tuple[RateWindow, ...] = (RateWindow(100, 60.0), RateWindow(1500, 3600.0))
    action_read_rate_limits: tuple[RateWindow, ...] = (RateWindow(100, 60.0), RateWindow(1500, 3600.0))
    rate_limit_margin_seconds: float = 1.0
    rate_limit_max_inline_wait_seconds: float = 5.0
    accept_lease_seconds: float = 30.0
    tag_rate_limits: tuple[RateWindow, ...] = (RateWindow(100, 60.0), RateWindow(1500, 3600.0))
    # Operators and callers (issue: the operator side).
    approval: str = "breaker"  # "breaker": hold only past the breaker; "always": every request is held
    hold_notify_url: str | None = None
    cancel: str = "any"  # "admin": cancelling needs the master key
    public_base_url: str | None = None
    operator_role: str = "Offboard.Operator"
    platform_rules: tuple[tuple[str, str], ...] = ()  # overrides of guardrails' platform table
    sdk_log_level: str = "WARNING"
    # The Intune watcher (a timer function).
    intune_watch_enabled: bool = False
    intune_watch_mode: str = "report"
    intune_watch_schedule: str = "0 */5 * * * *"
    graph_base_url: str = "https://graph.microsoft.com"
    graph_scope: str = "https://graph.microsoft.com/.default"
    # Many tenants: customer tenants reached through a multi-tenant app that trusts the
    # user-assigned managed identity (workload identity federation).
    tenants: tuple[Tenant, ...] = ()
    multitenant_app_client_id: str | None = None
    token_exchange_audience: str = "api://AzureADTokenExchange"  # noqa: S105 - an audience, not a secret

    @property
    def poison_queue_name(self) -> str:
        return f"{self.queue_name}-poison"

    @property
    def rate_limits(self) -> dict[str, tuple[RateWindow, ...]]:
        """Each Defender operation's own budget, keyed as `RateLimiter.reserve` expects."""
        return {
            "offboard": self.offboard_rate_limits,
            "machine-read": self.machine_read_rate_limits,
            "action-read": self.action_read_rate_limits,
            "machine-tag": self.tag_rate_limits,
        }

    def tenant(self, tenant_id: str | None) -> Tenant | None:
        """The allowed customer tenant with this id; None for the home tenant (no id)."""
        if tenant_id is None:
            return None
        return next((t for t in self.tenants if t.id == tenant_id), None)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        problems: list[str] = []

        def read(name: str, default: str | None, parse: Callable[[str], T]) -> T | None:
            raw = env.get(name, "").strip()
            if not raw:
                if default is None:
                    problems.append(f"{name} is required")
                    return None
                raw = default
            try:
                return parse(raw)
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
                return None

        storage: StorageAccess | None = None
        try:
            storage = StorageAccess.from_env(env)
        except StorageSettingsError as exc:
            problems.extend(exc.problems)
        values = {
            "storage": storage,
            "queue_name": read("OFFBOARD_QUEUE_NAME", "offboard-requests", _queue_name),
            "defender_base_url": read(
                "DEFENDER_API_BASE_URL", "https://api.securitycenter.microsoft.com", _base_url
            ),
            "defender_scope": read(
                "DEFENDER_API_SCOPE", "https://api.securitycenter.microsoft.com/.default", _scope
            ),
            "managed_identity_client_id": read("MANAGED_IDENTITY_CLIENT_ID", _EMPTY, _optional(_guid)),
            "default_comment": read("OFFBOARD_DEFAULT_COMMENT", DEFAULT_COMMENT, _default_comment),
            "max_attempts": read("OFFBOARD_MAX_ATTEMPTS", "8", _bounded_int(1, 100)),
            "retry_base_seconds": read("OFFBOARD_RETRY_BASE_SECONDS", "30", _bounded_float(0, 86_400)),
            "retry_max_seconds": read("OFFBOARD_RETRY_MAX_SECONDS", "3600", _bounded_float(0, 604_800)),
            "config_retry_seconds": read("OFFBOARD_CONFIG_RETRY_SECONDS", "900", _bounded_float(0, 604_800)),
            "connect_timeout_seconds": read("DEFENDER_CONNECT_TIMEOUT_SECONDS", "5", _bounded_float(0.1, 60)),
            "read_timeout_seconds": read("DEFENDER_READ_TIMEOUT_SECONDS", "30", _bounded_float(0.1, 230)),
            "state_table_name": read("OFFBOARD_STATE_TABLE_NAME", "offboardrequests", _table_name),
            "audit_table_name": read("OFFBOARD_AUDIT_TABLE_NAME", "offboardaudit", _table_name),
            "check_initial_seconds": read("OFFBOARD_CHECK_INITIAL_SECONDS", "60", _bounded_float(1, 86_400)),
            "check_max_seconds": read("OFFBOARD_CHECK_MAX_SECONDS", "3600", _bounded_float(1, 604_800)),
            "check_horizon_seconds": read(
                "OFFBOARD_CHECK_HORIZON_SECONDS", "259200", _bounded_float(1, 90 * 86_400)
            ),
            "precheck": read("OFFBOARD_PRECHECK", "true", _flag),
            "precheck_without_permission": read(
                "OFFBOARD_PRECHECK_WITHOUT_PERMISSION", "refuse", _choice("refuse", "proceed")
            ),
            "protected_tags": read("OFFBOARD_PROTECTED_TAGS", "-", _tags),
            "protected_group_ids": read("OFFBOARD_PROTECTED_GROUP_IDS", "-", _group_ids),
            "deny_list": read("OFFBOARD_DENY_LIST", "-", _deny_list),
            "dry_run": read("OFFBOARD_DRY_RUN", "false", _flag),
            # One Table storage row holds the window's timestamps (64 KiB): 1000 fit with room to spare.
            "breaker_limit": read("OFFBOARD_BREAKER_LIMIT", "25", _bounded_int(1, 1000)),
            "breaker_window_seconds": read(
                "OFFBOARD_BREAKER_WINDOW_SECONDS", "3600", _bounded_float(1, 7 * 86_400)
            ),
            "hold_expiry_seconds": read("OFFBOARD_HOLD_EXPIRY_SECONDS", "86400", _bounded_float(1, 604_800)),
            "tag_after_offboard": read("OFFBOARD_TAG_AFTER_SUCCESS", "-", _optional_tag),
            "rate_limit_table": read("RATE_LIMIT_TABLE_NAME", "offboardratelimits", _table_name),
            "offboard_rate_limits": read("DEFENDER_OFFBOARD_RATE_LIMITS", DEFAULT_RATE_LIMITS, _rate_limits),
            "machine_read_rate_limits": read(
                "DEFENDER_MACHINE_READ_RATE_LIMITS", DEFAULT_RATE_LIMITS, _rate_limits
            ),
            "action_read_rate_limits": read(
                "DEFENDER_ACTION_READ_RATE_LIMITS", DEFAULT_RATE_LIMITS, _rate_limits
            ),
            "rate_limit_margin_seconds": read("RATE_LIMIT_MARGIN_SECONDS", "1", _bounded_float(0, 60)),
            "rate_limit_max_inline_wait_seconds": read(
                "RATE_LIMIT_MAX_INLINE_WAIT_SECONDS", "5", _bounded_float(0, 60)
            ),
            "tag_rate_limits": read("DEFENDER_TAG_RATE_LIMITS", DEFAULT_RATE_LIMITS, _rate_limits),
            # A guard older than this whose request was never written belongs to a dead acceptor.
            "accept_lease_seconds": read("OFFBOARD_ACCEPT_LEASE_SECONDS", "30", _bounded_float(2, 600)),
            "approval": read("OFFBOARD_APPROVAL", "breaker", _choice("breaker", "always")),
            "hold_notify_url": read("OFFBOARD_HOLD_NOTIFY_URL", _EMPTY, _optional(_webhook_url)),
            "cancel": read("OFFBOARD_CANCEL", "any", _choice("any", "admin")),
            "public_base_url": read("OFFBOARD_PUBLIC_BASE_URL", _EMPTY, _optional(_public_base_url)),
            "operator_role": read("OFFBOARD_OPERATOR_ROLE", "Offboard.Operator", _role),
            "platform_rules": read("OFFBOARD_PLATFORM_RULES", _EMPTY, _platform_rules),
            "sdk_log_level": read(
                "OFFBOARD_SDK_LOG_LEVEL", "WARNING", _upper_choice("DEBUG", "INFO", "WARNING", "ERROR")
            ),
            "intune_watch_enabled": read("INTUNE_WATCH_ENABLED", "false", _flag),
            "intune_watch_mode": read("INTUNE_WATCH_MODE", "report", _choice("report", "offboard")),
            "intune_watch_schedule": read("INTUNE_WATCH_SCHEDULE", "0 */5 * * * *", _ncrontab),
            "graph_base_url": read("GRAPH_API_BASE_URL", "https://graph.microsoft.com", _base_url),
            "graph_scope": read("GRAPH_API_SCOPE", "https://graph.microsoft.com/.default", _scope),
            "tenants": _tenants(env, problems),
            "multitenant_app_client_id": read("MULTITENANT_APP_CLIENT_ID", _EMPTY, _optional(_guid)),
            "token_exchange_audience": read(
                "OFFBOARD_TOKEN_EXCHANGE_AUDIENCE", "api://AzureADTokenExchange", _audience
            ),
        }
        for name in ("OFFBOARD_QUEUE_NAME", "INTUNE_WATCH_SCHEDULE"):
            # The Functions host reads these (%NAME% in a binding) exactly as written.
            if env.get(name, "") != env.get(name, "").strip():
                problems.append(f"{name}: remove the spaces around it (the Functions host reads it as is)")
        if values["tenants"]:
            # Customer tenants are reached as the multi-tenant app, whose credential is a token
            # of the user-assigned identity: without either, no tenant could ever work.
            for name, key in (
                ("MULTITENANT_APP_CLIENT_ID", "multitenant_app_client_id"),
                ("MANAGED_IDENTITY_CLIENT_ID", "managed_identity_client_id"),
            ):
                if not values[key]:
                    problems.append(f"{name} is required when OFFBOARD_TENANTS lists tenants")
        if problems:
            raise SettingsError(problems)
        return cls(**values)  # type: ignore[arg-type]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings for this process, read on first use (never at import: cold starts stay cheap)."""
    return Settings.from_env()


def _queue_name(raw: str) -> str:
    if len(raw) > _MAX_WORK_QUEUE_NAME or not _QUEUE_NAME.fullmatch(raw):
        raise ValueError(
            f"{raw!r} is not a valid queue name (3-{_MAX_WORK_QUEUE_NAME} lowercase letters, "
            "digits or single hyphens, starting and ending with a letter or digit)"
        )
    return raw


def _table_name(raw: str) -> str:
    if not _TABLE_NAME.fullmatch(raw) or raw.lower() == "tables":
        raise ValueError(
            f"{raw!r} is not a valid table name (3-63 letters or digits, starting with a letter)"
        )
    return raw


def _rate_limits(raw: str) -> tuple[RateWindow, ...]:
    """`count/seconds[,count/seconds...]`, e.g. `100/60,1500/3600`: every window holds at once."""
    windows = []
    for part in raw.split(","):
        count, slash, seconds = part.strip().partition("/")
        try:
            window = RateWindow(int(count), float(seconds))
        except ValueError:
            window = None
        if not slash or window is None or not math.isfinite(window.seconds):
            raise ValueError(f"{part.strip()!r} is not count/seconds (e.g. 100/60,1500/3600)")
        if not 1 <= window.calls <= _MAX_RATE_COUNT:
            raise ValueError(f"{part.strip()!r}: the count must be 1..{_MAX_RATE_COUNT}")
        if not 0 < window.seconds <= 604_800:
            raise ValueError(f"{part.strip()!r}: the window must be more than 0 and at most 604800 seconds")
        windows.append(window)
    return tuple(windows)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _base_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{raw!r} is not an absolute http(s) URL")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError("must use https (plain http is allowed only for loopback hosts)")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must not carry credentials, a query or a fragment")
    return raw.rstrip("/")


def _webhook_url(raw: str) -> str:
    """A webhook to POST to: https (plain http only for loopback hosts), a query allowed (a
    Logic App's or Teams workflow's trigger URL carries its signature there: the URL is a
    secret, and never appears in a log or an error)."""
    parts = urlsplit(raw)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("is not an absolute http(s) URL")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError("must use https (plain http is allowed only for loopback hosts)")
    if parts.username or parts.password or parts.fragment:
        raise ValueError("must not carry a user name, a password or a fragment")
    return raw


def _scope(raw: str) -> str:
    if not raw.startswith("https://") or not raw.endswith("/.default"):
        raise ValueError(f"{raw!r} must be an https resource ending in '/.default'")
    return raw


# "-" is the default of the list settings: an empty list. An operator clears a list by
# leaving the setting empty.
_EMPTY = "-"
_TAG = re.compile(r"[^\x00-\x1f\x7f,]{1,200}")
_MACHINE_OR_NAME = re.compile(r"[0-9a-fA-F]{40}|(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


def _items(raw: str) -> list[str]:
    return [] if raw == _EMPTY else [item.strip() for item in raw.split(",") if item.strip()]


def _flag(raw: str) -> bool:
    value = raw.lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError(f"{raw!r} is not true or false")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError(f"{raw!r} is not one of {', '.join(choices)}")
        return raw.lower()

    return parse


def _tags(raw: str) -> tuple[str, ...]:
    items = _items(raw)
    bad = [t for t in items if not _TAG.fullmatch(t)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a machine tag (1-200 characters, no control characters)")
    return tuple(items)


def _optional_tag(raw: str) -> str | None:
    tags = _tags(raw)
    if len(tags) > 1:
        raise ValueError("give one tag")
    return tags[0] if tags else None


def _group_ids(raw: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(item) for item in _items(raw))
    except ValueError:
        raise ValueError(f"{raw!r} is not a comma-separated list of device group ids (numbers)") from None
    if any(i < 0 for i in ids):
        raise ValueError("device group ids are not negative")
    return ids


def _deny_list(raw: str) -> tuple[str, ...]:
    items = _items(raw)
    bad = [item for item in items if not _MACHINE_OR_NAME.fullmatch(item)]
    if bad:
        raise ValueError(f"{bad[0]!r} is neither a machine id (40 hex) nor a DNS name")
    return tuple(item.lower() for item in items)


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a whole number") from None
        if not low <= value <= high:
            raise ValueError(f"{value} is outside {low}..{high}")
        return value

    return parse


def _bounded_float(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a number") from None
        if not low <= value <= high:  # also refuses NaN
            raise ValueError(f"{value:g} is outside {low:g}..{high:g}")
        return value

    return parse


_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_ROLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,119}")
_TENANT_NAME = re.compile(r"[^\x00-\x1f\x7f,=;]{1,100}")


def _optional(parse: Callable[[str], T]) -> Callable[[str], T | None]:
    def parse_optional(raw: str) -> T | None:
        return None if raw == _EMPTY else parse(raw)

    return parse_optional


def _guid(raw: str) -> str:
    if not _GUID.fullmatch(raw):
        raise ValueError(f"{raw!r} is not a GUID")
    return raw.lower()


def _default_comment(raw: str) -> str:
    """The comment Defender records when a caller gives none: the callers' own rules."""
    problem = comment_problem(raw)
    if problem:
        raise ValueError(problem)
    return raw


def _role(raw: str) -> str:
    if not _ROLE.fullmatch(raw):
        raise ValueError(f"{raw!r} is not an app role value (letters, digits, dots, hyphens, underscores)")
    return raw


def _audience(raw: str) -> str:
    if not re.fullmatch(r"api://[A-Za-z0-9.-]{1,100}", raw):
        raise ValueError(f"{raw!r} is not a token exchange audience such as api://AzureADTokenExchange")
    return raw


def _upper_choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.upper() not in choices:
            raise ValueError(f"{raw!r} is not one of {', '.join(choices)}")
        return raw.upper()

    return parse


def _public_base_url(raw: str) -> str:
    """Where callers reach the app (a custom domain, API Management, Front Door): status URLs
    are built from it, never from a request's Host header."""
    url = _base_url(raw)
    if urlsplit(url).path.endswith("/api"):
        raise ValueError("give the base URL without /api (the app adds /api/offboard/...)")
    return url


def _platform_rules(raw: str) -> tuple[tuple[str, str], ...]:
    """`Platform=rule,...`: overrides of the precheck's platform table (domain.guardrails)."""
    from .domain.guardrails import parse_platform_rule

    rules = []
    for item in _items(raw):
        platform, equals, rule = item.partition("=")
        if not equals or not platform.strip():
            raise ValueError(f"{item!r} is not Platform=rule (e.g. macOS=min:14, Linux=allow)")
        try:
            rules.append((platform.strip().lower(), parse_platform_rule(rule.strip())))
        except ValueError as exc:
            raise ValueError(f"{item!r}: {exc}") from None
    return tuple(rules)


_PER_TENANT = {
    "OFFBOARD_PROTECTED_TAGS": ("protected_tags", _tags),
    "OFFBOARD_PROTECTED_GROUP_IDS": ("protected_group_ids", _group_ids),
}


def _overrides(env: Mapping[str, str], problems: list[str]) -> dict[str, dict[str, str]]:
    """The per-tenant settings present, by tenant id then setting, each name as written.

    The tenant id in a name is written with underscores for its hyphens (App Service setting
    names may hold only letters, digits, periods and underscores); hyphens work too, locally.
    """
    found: dict[str, dict[str, str]] = {}
    for name in env:
        setting, separator, suffix = name.partition("__")
        if not separator or setting.upper() not in _PER_TENANT:
            continue
        tenant_id = suffix.replace("_", "-").lower()
        if not _GUID.fullmatch(tenant_id):
            problems.append(f"{name}: {suffix!r} is not a tenant id (a GUID, with _ or - between its parts)")
            continue
        found.setdefault(tenant_id, {})[setting.upper()] = name
    return found


def _tenants(env: Mapping[str, str], problems: list[str]) -> tuple[Tenant, ...]:
    """OFFBOARD_TENANTS: `tenantId[=Display name],...`; per tenant, optional
    OFFBOARD_PROTECTED_TAGS__<tenantId> and OFFBOARD_PROTECTED_GROUP_IDS__<tenantId>.

    An override for a tenant that is not listed is an error, not ignored: a mistyped id
    would otherwise leave the tenant meant without the protection its operator asked for.
    """
    raw = env.get("OFFBOARD_TENANTS", "").strip()
    overrides_of = _overrides(env, problems)
    tenants: list[Tenant] = []
    for item in _items(raw) if raw else []:
        tenant_id, _, name = (part.strip() for part in item.partition("="))
        if not _GUID.fullmatch(tenant_id):
            problems.append(f"OFFBOARD_TENANTS: {tenant_id!r} is not a tenant id (a GUID)")
            continue
        if name and not _TENANT_NAME.fullmatch(name):
            problems.append(f"OFFBOARD_TENANTS: the name of {tenant_id} has characters a name cannot have")
            continue
        tenant_id = tenant_id.lower()
        if any(t.id == tenant_id for t in tenants):
            problems.append(f"OFFBOARD_TENANTS: {tenant_id} is listed twice")
            continue
        overrides: dict[str, object] = {}
        for setting, name_in_env in overrides_of.pop(tenant_id, {}).items():
            key, parse = _PER_TENANT[setting]
            try:
                overrides[key] = parse(env[name_in_env].strip() or _EMPTY)
            except ValueError as exc:
                problems.append(f"{name_in_env}: {exc}")
        tenants.append(Tenant(tenant_id, name or None, **overrides))  # type: ignore[arg-type]
    for names in overrides_of.values():
        problems.extend(f"{n}: names a tenant that OFFBOARD_TENANTS does not list" for n in names.values())
    return tuple(tenants)


_CRON_FIELD = re.compile(r"[0-9*/,\-A-Za-z]+")


def _ncrontab(raw: str) -> str:
    """An NCRONTAB expression as the Functions timer trigger takes it: six fields, seconds first."""
    fields = raw.split()
    if len(fields) != 6 or not all(_CRON_FIELD.fullmatch(f) for f in fields):
        raise ValueError(f"{raw!r} is not an NCRONTAB schedule of six fields, e.g. '0 */5 * * * *'")
    return " ".join(fields)
