"""Schemathesis drives every operation of /openapi.json with generated requests, valid (positive)
and broken (negative): none may get a 5xx, and every 2xx body must match the schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from server import ServeConfig, create_app

KEY = "schema-key"
OPERATIONS = ["GET /health", "GET /info", "POST /search", "GET /images/{image_id}", "GET /thumbnails/{image_id}",
              "POST /classify", "POST /cache/blend", "GET /duplicates"]


@pytest.fixture(scope="module")
def api_schema(served_library):
    # schemathesis' in-process client names itself "testserver", which the Host check must allow
    app = create_app(ServeConfig(store=served_library[0], api_key=KEY, max_k=100, max_batch=16,
                                 allow_hosts=("testserver",)))
    return schemathesis.openapi.from_asgi("/openapi.json", app, headers={"X-API-Key": KEY})


def test_the_schema_lists_every_operation(api_schema):
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels == set(OPERATIONS)
    for path in ("/search", "/classify"):  # JSON, or a multipart upload of the image
        content = api_schema.raw_schema["paths"][path]["post"]["requestBody"]["content"]
        assert set(content) == {"application/json", "multipart/form-data"}


NO_INPUT = {"GET /health", "GET /info"}  # nothing to break: negative generation has no case to make
RUNS = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + \
       [(label, GenerationMode.NEGATIVE) for label in OPERATIONS if label not in NO_INPUT]


@pytest.mark.parametrize("label, mode", RUNS, ids=[f"{label}-{mode.value}" for label, mode in RUNS])
def test_no_server_errors(api_schema, label, mode):
    operation = api_schema.find_operation_by_label(label)
    calls = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case):
        response = case.call_and_validate(headers={"X-API-Key": KEY},
                                          checks=[not_a_server_error, response_schema_conformance])
        calls.append(response.status_code)

    check()
    assert calls and all(code < 500 for code in calls)
