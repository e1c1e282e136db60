"""Endpoints that take either a JSON body or a multipart upload: one parser, one OpenAPI declaration.

FastAPI declares one body type per endpoint; /search and /classify take both, so their bodies are
read here and validated with the same pydantic models, and the schema lists both content types.
"""

from __future__ import annotations

from typing import Any, TypeVar, get_origin

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

JsonBody = TypeVar("JsonBody", bound=BaseModel)
FormBody = TypeVar("FormBody", bound=BaseModel)
COMPONENTS = "#/components/schemas/{model}"


async def read_body(request: Request, json_model: type[JsonBody], form_model: type[FormBody]) -> JsonBody | FormBody:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        return _validated(json_model, await request.body(), as_json=True)
    if kind == "multipart/form-data":  # not a urlencoded form: a web page on another site can send one unasked
        lists = {name for name, field in form_model.model_fields.items() if get_origin(field.annotation) is list}
        data: dict[str, Any] = {}
        async with request.form(max_files=1, max_fields=2000) as form:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    value = await value.read()
                elif key == "image":
                    raise RequestValidationError([{"loc": ("image",), "msg": "must be a file upload (-F image=@photo.jpg)"}])
                if key in lists:
                    data.setdefault(key, []).append(value)
                else:
                    data[key] = value
        return _validated(form_model, data, as_json=False)
    raise HTTPException(415, f"send application/json or multipart/form-data, not {kind or 'a body without a type'}")


def _validated(model: type[BaseModel], data: Any, as_json: bool) -> Any:
    try:
        return model.model_validate_json(data) if as_json else model.model_validate(data)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False, include_context=False)) from error


def body_openapi(json_model: type[BaseModel], form_model: type[BaseModel]) -> dict[str, Any]:
    """The ``openapi_extra`` of an endpoint taking either body (see :func:`add_component_schemas`)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": COMPONENTS.format(model=json_model.__name__)}},
        "multipart/form-data": {"schema": {"$ref": COMPONENTS.format(model=form_model.__name__)}},
    }}}


def add_component_schemas(schema: dict[str, Any], models: list[type[BaseModel]]) -> dict[str, Any]:
    """Put *models* (and the models they use) where :func:`body_openapi`'s references point."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        body = model.model_json_schema(ref_template=COMPONENTS)
        for name, definition in body.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components[model.__name__] = body
    return schema
