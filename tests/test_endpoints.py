"""Where a task may send its API key: the base URL allow-list (patterns), the rule for the
operator's default key, and the label an API-key Secret must carry. Pure decisions, no server."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import settings_refusal
from sandbox_agent.task import parse_task
from sandbox_operator.cluster_checks import validate_for_cluster
from sandbox_operator.endpoints import (
    BaseURLPattern,
    base_url_problem,
    parse_endpoint,
    secret_label_problem,
)
from sandbox_operator.errors import SpecError
from sandbox_operator.kube import ObjectMetadata
from sandbox_operator.settings import OperatorSettings

DEFAULT = "http://vllm.inference:8000/v1"


@pytest.mark.parametrize(
    ("pattern", "url", "matches"),
    [
        ("https://api.openai.com/v1", "https://api.openai.com/v1", True),
        ("https://api.openai.com/v1", "https://API.OpenAI.com/v1/", True),
        ("https://api.openai.com/v1", "https://api.openai.com:443/v1", True),
        ("https://api.openai.com/v1", "https://api.openai.com/v1/chat", True),
        ("https://api.openai.com/v1", "https://api.openai.com/v1beta", False),
        ("https://api.openai.com/v1", "https://api.openai.com/", False),
        ("https://api.openai.com/v1", "http://api.openai.com/v1", False),
        ("https://api.openai.com/v1", "https://api.openai.com:8443/v1", False),
        ("https://api.openai.com/v1", "https://api.openai.com.evil.example/v1", False),
        ("https://api.openai.com/v1", "https://evilapi.openai.com/v1", False),
        ("https://api.openai.com", "https://api.openai.com/anything/at/all", True),
        ("http://*.inference.svc:8000", "http://vllm.inference.svc:8000/v1", True),
        ("http://*.inference.svc:8000", "http://a.b.inference.svc:8000/v1", True),
        ("http://*.inference.svc:8000", "http://inference.svc:8000/v1", False),
        ("http://*.inference.svc:8000", "http://xinference.svc:8000/v1", False),
        ("http://*.inference.svc:8000", "http://vllm.inference.svc/v1", False),
        ("http://vllm:*/v1", "http://vllm:31337/v1", True),
        ("http://vllm:*/v1", "http://vllm/v1", True),
        ("http://10.0.0.7:8000/v1", "http://10.0.0.7:8000/v1", True),
        ("http://[fd00::7]:8000/v1", "http://[fd00:0::7]:8000/v1", True),
        ("http://[fd00::7]:8000/v1", "http://[fd00::8]:8000/v1", False),
        ("*", "https://anything.example:1234/x", True),
    ],
)
def test_base_url_patterns_match_scheme_host_port_and_path_prefix(
    pattern: str, url: str, matches: bool
) -> None:
    assert BaseURLPattern.parse(pattern).matches(parse_endpoint(url)) is matches


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://vllm.inference:8000@evil.example/v1", "user information"),
        ("http://user:pw@vllm.inference:8000/v1", "user information"),
        ("http://vllm.inference:8000/v1?x=1", "query or a fragment"),
        ("http://vllm.inference:8000/v1#frag", "query or a fragment"),
        ("http://vllm.inference:8000/v1/../admin", "'.' or '..' segments"),
        ("http://vllm.inference:8000/v1/%2e%2e/admin", "encoded"),
        ("http://vllm.inference:8000/v1%2Fx", "encoded"),
        ("http://vllm.inference:8000/v1\\x", "backslashes"),
        ("http://bücher.example/v1", "punycode"),
        ("http://under_score.example/v1", "not a DNS name"),
        ("ftp://vllm.inference/v1", "not an http or https URL"),
        ("http://vllm.inference:99999/v1", "invalid port"),
    ],
)
def test_urls_that_could_pass_for_another_are_refused_outright(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_endpoint(url)
    problem = base_url_problem(url, patterns=["*"], default_base_url=DEFAULT, default_key=False)
    assert problem is not None
    assert why.split("'")[0] in problem


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("api.openai.com/v1", "is not SCHEME://HOST"),
        ("ftp://x.example", "the scheme must be http or https"),
        ("https://a.*.example", "'*' may only stand first"),
        ("https://*.10.0.0.1", "'*.' needs a DNS name"),
        ("https://x.example:0", "outside 1-65535"),
        ("https://x.example/v1/../x", "'.' or '..' segments"),
        ("https://*", "may only stand first in the host"),
    ],
)
def test_a_bad_pattern_says_what_is_wrong(pattern: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        BaseURLPattern.parse(pattern)


def test_the_default_endpoint_is_always_allowed_and_others_only_by_pattern() -> None:
    def problem(url: str, patterns: list[str]) -> str | None:
        return base_url_problem(url, patterns=patterns, default_base_url=DEFAULT, default_key=False)

    assert problem(DEFAULT, []) is None
    assert problem(DEFAULT + "/", []) is None
    other = problem("https://api.openai.com/v1", [])
    assert other is not None
    assert "is not among the inference endpoints the operator allows" in other
    assert "LLMSANDBOX_ALLOWED_BASE_URLS" in other
    assert problem("https://api.openai.com/v1", ["https://api.openai.com/v1"]) is None
    # Without a default, an empty allow-list allows nothing.
    assert (
        base_url_problem(DEFAULT, patterns=[], default_base_url=None, default_key=False) is not None
    )


def test_the_operators_default_key_goes_to_its_default_endpoint_and_nowhere_else() -> None:
    def problem(url: str) -> str | None:
        return base_url_problem(url, patterns=["*"], default_base_url=DEFAULT, default_key=True)

    assert problem(DEFAULT) is None
    assert problem("HTTP://VLLM.inference:8000/v1/") is None
    elsewhere = problem("https://api.openai.com/v1")
    assert elsewhere is not None
    assert "the operator's default API key" in elsewhere
    assert "spec.model.apiKeySecretRef" in elsewhere


def task(**model: Any) -> Any:
    return parse_task(
        {
            "apiVersion": "llmsandbox.io/v1alpha1",
            "kind": "SandboxTask",
            "metadata": {"name": "t"},
            "spec": {"prompt": "p", "model": model},
        }
    )


def test_the_cluster_checks_name_spec_model_base_url() -> None:
    settings = OperatorSettings(
        default_base_url=DEFAULT, default_model="m", default_api_key_secret="llm-key"
    )
    validate_for_cluster(task(), settings)
    validate_for_cluster(task(baseURL=DEFAULT), settings)
    with pytest.raises(SpecError) as own_key:
        validate_for_cluster(
            task(baseURL="http://evil.example/v1", apiKeySecretRef={"name": "k", "key": "k"}),
            settings,
        )
    assert str(own_key.value).startswith("spec.model.baseURL: http://evil.example/v1 is not among")
    with pytest.raises(SpecError) as default_key:
        validate_for_cluster(task(baseURL="http://evil.example/v1"), settings)
    assert default_key.value.field_path == "spec.model.baseURL"
    assert "the operator's default API key" in str(default_key.value)


@pytest.mark.parametrize(
    ("labels", "label", "refused"),
    [
        ({"llmsandbox.io/api-key": "true"}, "llmsandbox.io/api-key=true", False),
        ({"llmsandbox.io/api-key": "false"}, "llmsandbox.io/api-key=true", True),
        ({}, "llmsandbox.io/api-key=true", True),
        ({"team/llm": ""}, "team/llm=", False),
        ({}, "", False),
    ],
)
def test_a_secret_is_an_api_key_only_with_the_operators_label(
    labels: dict[str, str], label: str, refused: bool
) -> None:
    problem = secret_label_problem(ObjectMetadata(name="db-password", labels=labels), label)
    assert (problem is not None) is refused
    if problem is not None:
        assert problem.startswith(f'secret "db-password" lacks label {label}')


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        (
            "LLMSANDBOX_ALLOWED_BASE_URLS",
            '["https://api.openai.com/v1", "api.example/v1"]',
            "LLMSANDBOX_ALLOWED_BASE_URLS[1]: 'api.example/v1' is not SCHEME://HOST",
        ),
        (
            "LLMSANDBOX_API_KEY_SECRET_LABEL",
            "llmsandbox.io/api-key",
            "LLMSANDBOX_API_KEY_SECRET_LABEL: 'llmsandbox.io/api-key' is not key=value",
        ),
        (
            "LLMSANDBOX_DEFAULT_BASE_URL",
            "http://user@vllm:8000/v1",
            "LLMSANDBOX_DEFAULT_BASE_URL: a base URL may not carry user information",
        ),
    ],
)
def test_bad_endpoint_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, line: str
) -> None:
    lines = settings_refusal(monkeypatch, {variable: value})
    assert any(text.startswith(line) for text in lines), lines


def test_by_default_only_the_default_endpoint_and_labelled_secrets_are_allowed() -> None:
    settings = OperatorSettings()
    assert settings.allowed_base_urls == []
    assert settings.api_key_secret_label == "llmsandbox.io/api-key=true"
