"""Clients of a test server: the OpenAI SDK and httpx, ignoring proxies from the environment
(``trust_env=False``) and never retrying, so a failure shows at once."""

from __future__ import annotations

import httpx
import openai


def openai_client(base_url: str, timeout_s: float = 60.0, api_key: str = "unused") -> openai.OpenAI:
    """The OpenAI SDK pointed at ``base_url``'s ``/v1``."""
    return openai.OpenAI(
        base_url=base_url + "/v1",
        api_key=api_key,
        max_retries=0,
        http_client=httpx.Client(trust_env=False, timeout=timeout_s),
    )


def http_client(base_url: str, timeout_s: float = 60.0) -> httpx.Client:
    """A plain HTTP client with ``base_url``."""
    return httpx.Client(base_url=base_url, timeout=timeout_s, trust_env=False)
