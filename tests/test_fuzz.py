"""Fuzzing: schemathesis over the API's own OpenAPI, in-process, with an admin key, on the real
model over SQLite. No request gets a server error, and every status code, content type and
response body is what the schema declares.
Bounded and seeded: the same examples every run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema
from sqlalchemy.orm import Session

from monitor.service.app import create_app
from monitor.service.keys import create_key
from monitor.service.monitored import Monitored
from monitor.service.settings import ServiceSettings

pytestmark = pytest.mark.slow

# Per operation: enough to reach NUL, lone surrogates and out-of-range numbers in the fields
# (the kinds of input that once gave 500s), while the whole file stays within a few minutes.
EXAMPLES = 100

# The operations, from the schema FastAPI builds without starting the app: each with inputs
# that fit the schema (positive), and, where it takes any input, inputs that break it (negative).
CASES = [
    pytest.param(method.upper(), path, mode, id=f"{method.upper()} {path} {mode}")
    for path, item in create_app(ServiceSettings()).openapi()["paths"].items()
    for method, op in item.items()
    for mode in GenerationMode
    if mode == GenerationMode.POSITIVE or op.get("parameters") or op.get("requestBody")
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, monitored: Monitored) -> Iterator[TestClient]:
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'monitor.db'}"
    service = ServiceSettings(database_url=url, batch_wait_ms=20, retention_interval_s=0)
    with TestClient(create_app(service, [monitored])) as c:
        yield c


@pytest.fixture(scope="module")
def api_schema(client: TestClient) -> OpenApiSchema:
    return schemathesis.openapi.from_dict(client.get("/openapi.json").json())


@pytest.fixture(scope="module")
def admin(client: TestClient) -> dict[str, str]:
    with Session(client.app.state.monitor.engine) as session:  # type: ignore[attr-defined]
        key = create_key(session, "fuzz", "admin")
        session.commit()
    return {"Authorization": f"Bearer {key}"}


def send(client: TestClient, case: schemathesis.Case, headers: dict[str, str]) -> Any:
    """The case sent through the app's own test client (httpx). Schemathesis's transports go
    through requests, whose urllib3 here is urllib3-future (pulled in by grafana-client), which
    schemathesis 4 cannot count connections on."""
    kw = case.as_transport_kwargs(base_url=str(client.base_url), headers=headers)
    assert set(kw) <= {"method", "url", "headers", "params", "cookies", "json", "data"}, kw
    assert not kw["cookies"], "the API takes no cookies (the UI is outside the schema)"
    body = {"json": kw["json"]} if "json" in kw else {"content": kw["data"]} if "data" in kw else {}
    return client.request(
        kw["method"], kw["url"], params=kw.get("params"), headers=kw["headers"], **body
    )


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_no_server_error_and_every_status_documented(
    client: TestClient,
    api_schema: OpenApiSchema,
    admin: dict[str, str],
    method: str,
    path: str,
    mode: GenerationMode,
) -> None:
    @given(case=api_schema[path][method].as_strategy(mode))
    @seed(20261121)
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        response = send(client, case, admin)
        case.validate_response(
            response,
            checks=[
                not_a_server_error,
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
            ],
        )

    check()
