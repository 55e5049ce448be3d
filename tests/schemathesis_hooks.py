"""Schemathesis hooks for Nova's API (``SCHEMATHESIS_HOOKS=schemathesis_hooks`` with ``tests``
on the path; tests/test_server_fuzz.py and benchmarks/schemathesis_long.py use it).

``positive_data_acceptance_nova`` stands in for schemathesis's ``positive_data_acceptance``
(run with ``--exclude-checks positive_data_acceptance``): a schema-valid request must get a
2xx, 404 or 5xx as there, or a 400 whose error code is one of
``nova.server.errors.SCHEMA_INVISIBLE_CODES``: refusals the published schema cannot express
(the model's context length and vocabulary, image contents and counts, two fields that are
valid alone but not together). Any other 400 for valid data is a failure.
"""

from __future__ import annotations

import json

import schemathesis

from nova.server.errors import SCHEMA_INVISIBLE_CODES


@schemathesis.check
def positive_data_acceptance_nova(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if 200 <= status < 300 or status in (401, 404) or status >= 500:
        return None
    code = None
    if status == 400:
        try:
            code = json.loads(response.content)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        if code in SCHEMA_INVISIBLE_CODES:
            return None
    raise AssertionError(
        f"schema-valid request refused with {status} (code {code!r}): {response.content[:300]!r}"
    )
