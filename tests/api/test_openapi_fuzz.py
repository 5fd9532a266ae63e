"""Schemathesis against the app's own OpenAPI schema: no generated request may cause a 5xx."""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.api.conftest import Tenant

#: Examples per operation; derandomized so failures reproduce.
MAX_EXAMPLES = 10


@pytest.mark.slow
def test_no_generated_request_causes_a_server_error(app, tenant_a: Tenant, admin: Tenant):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]

    for operation in operations:
        auth = (admin if operation.path.startswith("/admin") else tenant_a).headers

        @settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case) -> None:
            response = case.call(headers=auth)  # noqa: B023 (called within this iteration)
            statuses[response.status_code] += 1
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:200]}"
                )

        check()

    assert len(operations) >= 15
    # The key got past auth: most requests were answered by the handlers, not with 401.
    assert sum(n for code, n in statuses.items() if code < 300) > len(operations)
    assert not failures, "\n".join(failures)
