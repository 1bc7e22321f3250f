"""schemathesis against ember's own OpenAPI document: whatever it sends, the server never answers 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from tests.server import running_server


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with running_server(max_num_predict=64, max_num_ctx=2048) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(server_url: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{server_url}/openapi.json")


def test_no_request_makes_the_server_fail(api_schema: schemathesis.BaseSchema, server_url: str) -> None:
    """Each operation gets up to 25 generated requests (a few hundred in all), valid and invalid alike."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) > 10
    calls = 0

    for operation in operations:

        @given(case=operation.as_strategy())
        # Derandomized: the same cases every run, so a failure found here reproduces (one random run of the
        # whole suite saw the test process grow past 24 GB during this test; not yet found, see the note).
        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as generated
        )
        def check(case: schemathesis.Case) -> None:
            nonlocal calls
            calls += 1
            response = case.call(base_url=server_url, timeout=60)
            where = f"{case.method} {case.formatted_path}"
            assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
            content_type = str(response.headers.get("content-type", ""))
            if response.status_code >= 400 and "application/json" in content_type and case.method != "HEAD":
                assert "error" in response.json() and "Traceback" not in response.text

        check()
    assert calls >= 100
