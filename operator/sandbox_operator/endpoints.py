"""Which inference endpoints a task may send its API key to, and which Secrets may be API keys.

A task names both `spec.model.baseURL` (any URL) and `spec.model.apiKeySecretRef` (any Secret in
its namespace), and the agent sends that Secret's value as a Bearer token to that URL. Without
limits this is a confused deputy: anyone who may create a task could send any Secret of the
namespace to a host of their own. So a base URL must match the operator's allow-list, and a
Secret must carry the operator's API-key label. Pure functions; the Secret read is the caller's.

Pattern syntax (LLMSANDBOX_ALLOWED_BASE_URLS), one pattern per entry:

    SCHEME://HOST[:PORT][/PATH]      e.g. https://api.openai.com/v1, http://*.inference.svc:8000
    *                                any http or https URL (single-tenant clusters only)

- SCHEME is `http` or `https`, and must be the URL's.
- HOST is a DNS name or an IP address (IPv6 in brackets), compared case-insensitively. A leading
  `*.` matches one or more labels: `*.example.com` matches `a.example.com` and `a.b.example.com`,
  not `example.com`. No other wildcard exists.
- PORT is a number or `*` (any port); without one, only the scheme's default port (80, 443).
- PATH is a prefix on `/` boundaries: `/v1` matches `/v1` and `/v1/chat`, not `/v1beta`.
  Without a path, or `/`, any path.

A URL is refused outright (whatever the patterns) when it has user information (`user@host`), a
query or a fragment, a non-ASCII host, or a path with `.`/`..` segments, backslashes or encoded
`.`, `/` or `\\`: each could make a URL look like an allowed one and mean another.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from .kube import ObjectMetadata

ANY_URL = "*"
DEFAULT_PORTS = {"http": 80, "https": 443}
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$"
)
_ENCODED_SEPARATORS = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


@dataclass(frozen=True)
class Endpoint:
    """A base URL reduced to what decides where its requests go."""

    scheme: str
    host: str
    port: int
    path: str  # no trailing "/"; "" for the root


def _host(text: str) -> str:
    """A host as compared: lower-case, no trailing dot, IP addresses in canonical form."""
    host = text.lower().removesuffix(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host.isascii():
        raise ValueError(f"host {text!r} is not ASCII; write it in its punycode (xn--) form")
    if not _DNS_NAME.match(host):
        raise ValueError(f"host {text!r} is not a DNS name or an IP address")
    return host


def _path(text: str) -> str:
    if "\\" in text or _ENCODED_SEPARATORS.search(text):
        raise ValueError("the path may not hold backslashes or encoded '.', '/' or '\\'")
    segments = text.split("/")
    if any(s in (".", "..") for s in segments):
        raise ValueError("the path may not hold '.' or '..' segments")
    return text.rstrip("/")


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_dns_name(host: str) -> bool:
    return not is_ip_address(host) and bool(_DNS_NAME.match(host))


def parse_endpoint(url: str) -> Endpoint:
    """The endpoint a base URL points at; ValueError says why the URL is refused."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"{url!r} is not an http or https URL")
    if "@" in parts.netloc:
        raise ValueError("a base URL may not carry user information (user@host)")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError("a base URL may not have a query or a fragment")
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port") from None
    return Endpoint(scheme, _host(parts.hostname), port or DEFAULT_PORTS[scheme], _path(parts.path))


@dataclass(frozen=True)
class BaseURLPattern:
    """One entry of the allow-list; see the module docstring for the syntax."""

    text: str
    scheme: str = ""
    host: str = ""
    subdomains: bool = False  # the host was written `*.<host>`
    port: int | None = None  # None: any port
    path: str = ""  # "": any path

    @classmethod
    def parse(cls, text: str) -> BaseURLPattern:
        """ValueError says what is wrong with the pattern."""
        if text == ANY_URL:
            return cls(text)
        match = re.fullmatch(
            r"(?P<scheme>[a-z]+)://(?P<host>\[[^\]]+\]|[^/:]+)(?::(?P<port>\*|\d+))?(?P<path>/.*)?",
            text,
        )
        if match is None:
            raise ValueError(f"{text!r} is not SCHEME://HOST[:PORT][/PATH] or '*'")
        scheme = match["scheme"]
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"{text!r}: the scheme must be http or https")
        host = match["host"].strip("[]")
        subdomains = host.startswith("*.")
        if "*" in host.removeprefix("*."):
            raise ValueError(f"{text!r}: '*' may only stand first in the host, as '*.'")
        host = _host(host.removeprefix("*."))
        if subdomains and not _is_dns_name(host):
            raise ValueError(f"{text!r}: '*.' needs a DNS name after it")
        port_text = match["port"]
        port = None if port_text == "*" else int(port_text or DEFAULT_PORTS[scheme])
        if port is not None and not 1 <= port <= 65_535:
            raise ValueError(f"{text!r}: port {port} is outside 1-65535")
        return cls(text, scheme, host, subdomains, port, _path(match["path"] or ""))

    def matches(self, endpoint: Endpoint) -> bool:
        if self.text == ANY_URL:
            return True
        if endpoint.scheme != self.scheme or (self.port is not None and endpoint.port != self.port):
            return False
        if self.subdomains:
            if not endpoint.host.endswith("." + self.host):
                return False
        elif endpoint.host != self.host:
            return False
        return (
            not self.path or endpoint.path == self.path or endpoint.path.startswith(self.path + "/")
        )


def valid_pattern(text: str) -> str:
    """For pydantic: the pattern unchanged, or ValueError naming what is wrong."""
    BaseURLPattern.parse(text)
    return text


def base_url_problem(
    url: str,
    *,
    patterns: list[str],
    default_base_url: str | None,
    default_key: bool,
) -> str | None:
    """Why a task may not send its API key to `url` (its spec.model.baseURL), or None.

    `patterns` is the operator's allow-list; the operator's own default base URL is always
    allowed. With the operator's default key (`default_key`: the task names no Secret) only that
    default endpoint is: the operator's key never goes where a task points it."""
    try:
        endpoint = parse_endpoint(url)
    except ValueError as exc:
        return str(exc)
    default = _parsed_or_none(default_base_url)
    if default_key:
        if endpoint == default:
            return None
        where = f" {default_base_url}" if default_base_url else ""
        return (
            f"{url} is not the operator's default endpoint{where}: the operator's default API key "
            "(LLMSANDBOX_DEFAULT_API_KEY_SECRET) is sent nowhere else; name your own key in "
            "spec.model.apiKeySecretRef, or leave baseURL out"
        )
    if endpoint == default or any(BaseURLPattern.parse(p).matches(endpoint) for p in patterns):
        return None
    return (
        f"{url} is not among the inference endpoints the operator allows "
        "(LLMSANDBOX_ALLOWED_BASE_URLS); ask the cluster's operators to allow it"
    )


def _parsed_or_none(url: str | None) -> Endpoint | None:
    if not url:
        return None
    try:
        return parse_endpoint(url)
    except ValueError:
        return None


def parse_label(text: str) -> tuple[str, str]:
    """`key=value` as (key, value); ValueError when it is not."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"{text!r} is not key=value")
    return key, value


def secret_label_problem(metadata: ObjectMetadata, label: str) -> str | None:
    """Why the Secret may not be a task's API key (it lacks `label`), or None. An empty
    `label` turns the check off."""
    if not label:
        return None
    key, value = parse_label(label)
    if metadata.labels.get(key) == value:
        return None
    return (
        f'secret "{metadata.name}" lacks label {key}={value}, which marks the Secrets tasks may '
        f"use as API keys; label it (kubectl label secret {metadata.name} {key}={value}) if it "
        "is meant for that"
    )


def canonical_base_url(url: str) -> str:
    """A base URL as endpoint admission groups compare it: scheme and host lower case, no
    trailing slash."""
    parts = urlsplit(url.strip())
    path = parts.path.rstrip("/")
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, "", ""))
