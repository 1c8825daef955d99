"""The OpenAI-compatible LLM backend on Azure OpenAI (``options.api_type: azure``), against a
loopback server that implements Azure's URL layout and authentication: deployments in the
path, ``api-version`` in the query, an ``api-key`` header or an Azure AD bearer token."""
from __future__ import annotations

import json

import numpy as np
import pytest

from actors.llm import LLMStage
from actors.models import resolve
from tests.helpers import LoopbackServer, chat_completion
from udfs import rows

KEY = "azure-key-MMSYNTH-do-not-leak-17"
TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOi.mmsynth.ad-token"
VERSIONS = {"2023-06-01-preview", "2024-10-21"}
DEPLOYMENTS = {"gpt-4o", "gpt-4o-450K"}


def azure_respond(req):
    """Azure OpenAI's answers: 404 for another path or an unknown deployment, 400 for a missing
    or unknown api-version, 401 without valid credentials (echoing the key it got, so scrubbing
    is tested); otherwise a completion naming the deployment and the credential kind."""
    parts = req["path"].strip("/").split("/")
    if len(parts) != 5 or parts[:2] != ["openai", "deployments"] or parts[3:] != ["chat", "completions"]:
        return 404, {"error": {"code": "404", "message": "Resource not found"}}, {}
    version = (req["query"].get("api-version") or [None])[0]
    if version not in VERSIONS:
        return 400, {"error": {"code": "BadRequest", "message": f"API version {version} not supported"}}, {}
    headers = req["headers"]
    if headers.get("api-key") == KEY:
        auth = "key"
    elif headers.get("authorization") == f"Bearer {TOKEN}":
        auth = "ad_token"
    else:
        got = headers.get("api-key") or headers.get("authorization")
        return 401, {"error": {"code": "401", "message": f"Access denied: invalid credential {got}"}}, {}
    if parts[2] not in DEPLOYMENTS:
        return 404, {"error": {"code": "DeploymentNotFound", "message": f"no deployment {parts[2]}"}}, {}
    content = json.dumps({"deployment": parts[2], "auth": auth, "version": version})
    return 200, chat_completion(req["body"]["model"], content), {}


@pytest.fixture
def azure(monkeypatch):
    for var in ("AZURE_OPENAI_ENDPOINT", "OPENAI_API_VERSION", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_AD_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with LoopbackServer(azure_respond) as srv:
        yield srv


def _stage(model, **options):
    spec = {"backend": "openai", "model": model,
            "options": {"api_type": "azure", "max_retries": 1, "backoff_s": 0.01, "timeout_s": 5, **options}}
    return LLMStage(resolve(spec).model_dump(), {"temperature": 0, "response_schema": {"type": "json_object"}})


def _ask(stage, text="Which chart type is this?"):
    return stage({"id": np.array(["r1"], dtype=object),
                  "messages": np.array([json.dumps([{"role": "user", "content": text}])], dtype=object)})


def test_azure_key_from_environment(azure, monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", azure.url)
    monkeypatch.setenv("OPENAI_API_VERSION", "2023-06-01-preview")  # the original's version (SPEC D6)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
    out = _ask(_stage("gpt-4o-450K"))
    assert out[rows.ROW_ERROR][0] is None, out[rows.ROW_ERROR][0]
    assert json.loads(out["parsed"][0]) == {"deployment": "gpt-4o-450K", "auth": "key", "version": "2023-06-01-preview"}
    req = azure.requests[-1]
    assert req["path"] == "/openai/deployments/gpt-4o-450K/chat/completions"
    assert req["query"]["api-version"] == ["2023-06-01-preview"] and req["headers"]["api-key"] == KEY
    assert "authorization" not in req["headers"]
    assert req["body"]["response_format"] == {"type": "json_object"} and req["body"]["temperature"] == 0


def test_azure_ad_token_options_and_fixed_deployment(azure, monkeypatch):
    monkeypatch.setenv("MMSYNTH_AZ_TOKEN", TOKEN)
    stage = _stage("my-gpt4o", azure_endpoint=azure.url, api_version="2024-10-21", azure_deployment="gpt-4o",
                   azure_ad_token_env="MMSYNTH_AZ_TOKEN")
    out = _ask(stage)
    assert json.loads(out["parsed"][0]) == {"deployment": "gpt-4o", "auth": "ad_token", "version": "2024-10-21"}
    req = azure.requests[-1]
    assert req["headers"]["authorization"] == f"Bearer {TOKEN}" and "api-key" not in req["headers"]


def test_azure_errors_are_row_errors_without_secrets(azure, monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", azure.url)
    monkeypatch.setenv("OPENAI_API_VERSION", "2024-10-21")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
    out = _ask(_stage("gpt-4-unknown"))  # no such deployment: 404, not retried
    assert out[rows.ROW_ERROR][0].startswith("NotFoundError") and "no deployment gpt-4-unknown" in out[rows.ROW_ERROR][0]
    assert len(azure.requests) == 1
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY + "-wrong")
    out = _ask(_stage("gpt-4o"))
    err = out[rows.ROW_ERROR][0]
    assert err.startswith("AuthenticationError") and "invalid credential ***" in err and KEY not in err


def test_azure_missing_settings_fail_loudly(monkeypatch):
    for var in ("AZURE_OPENAI_ENDPOINT", "OPENAI_API_VERSION", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_AD_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="AZURE_OPENAI_ENDPOINT"):
        _stage("gpt-4o")
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ValueError, match="OPENAI_API_VERSION"):
        _stage("gpt-4o")
    monkeypatch.setenv("OPENAI_API_VERSION", "2024-10-21")
    with pytest.raises(ValueError, match="AZURE_OPENAI_API_KEY.*AZURE_OPENAI_AD_TOKEN"):
        _stage("gpt-4o")
    with pytest.raises(ValueError, match="api_type"):
        LLMStage(resolve({"backend": "openai", "model": "m", "options": {"api_type": "bedrock"}}).model_dump(), {})
