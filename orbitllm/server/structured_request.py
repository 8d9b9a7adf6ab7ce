"""A request's output constraint from whichever field carries it: OpenAI's
``response_format``, vLLM's ``structured_outputs`` or its older ``guided_*`` fields.

At most one may be set; the result is the offline API's ``StructuredOutputsParams``,
so the server and ``LLM.generate`` constrain output the same way.
"""
from __future__ import annotations

from orbitllm.sampling_params import StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}


def structured_outputs_of(body) -> StructuredOutputsParams | None:
    """ValueError naming the field when the constraint is malformed or set twice."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        found.append(("response_format", _from_response_format(fmt)))
    if body.structured_outputs is not None:
        so = body.structured_outputs
        found.append(("structured_outputs", _params(
            "structured_outputs", json=so.json_, regex=so.regex, choice=so.choice,
            grammar=so.grammar, json_object=so.json_object)))
    for name, kind in _GUIDED.items():
        value = getattr(body, name)
        if value is not None:
            found.append((name, _params(name, **{kind: value})))
    if len(found) > 1:
        raise ValueError(f"{found[1][0]}: only one output constraint may be set, got "
                         f"{', '.join(name for name, _ in found)}")
    return found[0][1] if found else None


def source_field(body) -> str:
    """The request field a constraint came from, to name it in a compile error."""
    if body.response_format is not None and body.response_format.type != "text":
        return ("response_format.json_schema.schema" if body.response_format.type == "json_schema"
                else "response_format")
    if body.structured_outputs is not None:
        return "structured_outputs"
    # Else tool_choice forced a call: the schema is the tools' parameters.
    return next((name for name in _GUIDED if getattr(body, name) is not None), "tools")


def _from_response_format(fmt) -> StructuredOutputsParams:
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise ValueError("response_format: type json_schema needs json_schema.schema")
    return StructuredOutputsParams(json=fmt.json_schema.json_schema)


def _params(field: str, **kwargs) -> StructuredOutputsParams:
    """Name the request's field in errors (the params name their own)."""
    try:
        return StructuredOutputsParams(**kwargs)
    except ValueError as e:
        raise ValueError(f"{field}: {str(e).removeprefix('structured_outputs: ')}") from None
