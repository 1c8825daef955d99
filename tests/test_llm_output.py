"""Pure LLM request/reply helpers: fences, JSON extraction, validation, repair, Arrow artefacts."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from pydantic import BaseModel, Field

from udfs.llm_output import (
    REPAIR_MARKER,
    MessagesError,
    OutputParseError,
    OutputValidationError,
    extract_json,
    normalize_messages,
    normalize_sampling,
    output_format,
    parse_response_format,
    reject_reason,
    repair_messages,
    schema_from,
    strip_code_fences,
    strip_nones,
    text_only_messages,
    with_system_prompt,
)


class SceneObjects(BaseModel):
    """Antidote-like caption parse (an alias for the hyphenated key)."""

    caption: str
    present: list[str] = Field(min_length=1)
    no_exist: list[str] = Field(alias="no-exist", min_length=1)


BOX_SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "pattern": "^[a-z ]{1,12}$"},
                   "score": {"type": "number", "minimum": 0, "maximum": 1},
                   "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}},
    "required": ["label", "score"],
    "additionalProperties": False,
}


# ----------------------------------------------------------------- fences and JSON

@pytest.mark.parametrize("text, expected", [
    ('```json\n{"a": 1}\n```', '{"a": 1}'),
    ('Here you go:\n```\n[1, 2]\n```\nDone.', "[1, 2]"),
    ('```JSON  \n{"a": 1}```', '{"a": 1}'),
    ('  {"a": 1}  ', '{"a": 1}'),
    ('```json\n{"a": 1', '{"a": 1'),  # truncated reply: opening fence removed
    ("", ""),
])
def test_strip_code_fences(text, expected):
    assert strip_code_fences(text) == expected


def test_extract_json_variants():
    assert extract_json('```json\n{"present": ["dog"]}\n```') == {"present": ["dog"]}
    assert extract_json('Sure! The answer is {"x": [1, 2]} as requested.') == {"x": [1, 2]}
    assert extract_json('noise [1, "a"] tail') == [1, "a"]
    # raw control characters inside strings (xgrammar lets them through) are tolerated
    assert extract_json('{"name": "a\x01b\tc"}') == {"name": "a\x01b\tc"}
    # a broken first candidate does not hide a later valid one
    assert extract_json('{broken {"ok": true}') == {"ok": True}
    with pytest.raises(OutputParseError, match="no JSON value"):
        extract_json("I cannot answer that.")
    with pytest.raises(OutputParseError):
        extract_json('{"unterminated": "str')


# ----------------------------------------------------------------- formats

def test_json_schema_dict_validation():
    fmt = output_format(response_schema=BOX_SCHEMA)
    assert fmt.kind == "json_schema" and fmt.is_json
    parsed = fmt.validate('```json\n{"label": "red box", "score": 0.5, "tags": ["x"]}\n```')
    assert json.loads(parsed) == {"label": "red box", "score": 0.5, "tags": ["x"]}
    with pytest.raises(OutputValidationError, match=r"at score: 3 is greater than the maximum of 1"):
        fmt.validate('{"label": "box", "score": 3}')
    with pytest.raises(OutputValidationError, match=r"at label: 'Red Box!' does not match"):
        fmt.validate('{"label": "Red Box!", "score": 0.1}')
    with pytest.raises(OutputValidationError, match="at tags"):
        fmt.validate('{"label": "box", "score": 0.1, "tags": ["a", "b", "c"]}')
    with pytest.raises(OutputValidationError, match="invalid JSON"):
        fmt.validate('{"label": "box", ')
    with pytest.raises(OutputValidationError, match="'score' is a required property"):
        fmt.validate('{"label": "box"}')


def test_pydantic_model_by_import_path_keeps_aliases():
    fmt = output_format(response_schema=f"{__name__}:SceneObjects")
    assert fmt.model is SceneObjects and fmt.name == "SceneObjects"
    assert "no-exist" in fmt.schema["properties"]
    parsed = json.loads(fmt.validate('{"caption": "a dog", "present": ["dog"], "no-exist": ["leash"]}'))
    assert parsed == {"caption": "a dog", "present": ["dog"], "no-exist": ["leash"]}
    with pytest.raises(OutputValidationError, match="no-exist"):
        fmt.validate('{"caption": "a dog", "present": ["dog"], "no-exist": []}')
    # the class itself works as well
    assert output_format(response_schema=SceneObjects).model is SceneObjects


def test_regex_ebnf_text_and_json_object_formats():
    rx = output_format(regex=r"(yes|no), [a-z]{1,8}")
    assert rx.validate("yes, maybe") is None
    assert rx.validate("no, cat\n") is None  # one trailing newline tolerated
    with pytest.raises(OutputValidationError, match="regular expression"):
        rx.validate("yes, maybe not")
    eb = output_format(ebnf='root ::= "A" [0-9]')
    assert eb.kind == "ebnf" and eb.validate("whatever was produced") is None
    assert output_format().validate("free text") is None
    jo = output_format(response_schema={"type": "json_object"})
    assert jo.kind == "json_object" and json.loads(jo.validate('x {"k": 1}')) == {"k": 1}
    with pytest.raises(ValueError, match="mutually exclusive"):
        output_format(response_schema=BOX_SCHEMA, regex="a+")
    with pytest.raises(ValueError, match="invalid regex"):
        output_format(regex="(")
    with pytest.raises(ValueError, match="invalid JSON schema"):
        output_format(response_schema={"type": "no-such-type"})


def test_schema_from_openai_response_format_and_arrow_nulls():
    rf = {"type": "json_schema", "json_schema": {"name": "box", "schema": {**BOX_SCHEMA, "title": None}}}
    schema, model, name = schema_from(rf)
    assert name == "box" and model is None and "title" not in schema
    fmt = parse_response_format(json.dumps(BOX_SCHEMA))
    assert fmt.kind == "json_schema" and fmt.schema == BOX_SCHEMA
    assert parse_response_format(None) is None and parse_response_format("  ") is None
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_response_format("{oops")


# ----------------------------------------------------------------- requests

def test_strip_nones_recursive():
    body = {"model": "m", "seed": None, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi", "image_url": None},
                                     {"type": "image_url", "image_url": {"url": "data:x", "detail": None},
                                      "text": None}]}],
        "response_format": {"schema": {"properties": {"a": {"type": "string", "maxLength": None}}}}}
    clean = strip_nones(body)
    assert clean == {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"},
                                     {"type": "image_url", "image_url": {"url": "data:x"}}]}],
        "response_format": {"schema": {"properties": {"a": {"type": "string"}}}}}
    assert strip_nones([1, None, {"a": None}]) == [1, None, {}]


def test_normalize_messages_after_arrow_round_trip():
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is shown?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}}]}]
    # mixed content types cannot share an Arrow column: store the text-only variant in Arrow
    arrow_msgs = [{"role": "user", "content": [{"type": "text", "text": "hello"},
                                               {"type": "image_url", "image_url": {"url": "data:x"}}]}]
    table = pa.Table.from_pylist([{"messages": arrow_msgs}])
    cell = table.column("messages").to_numpy(zero_copy_only=False)[0]
    assert isinstance(cell, np.ndarray)  # Ray Data numpy batches look like this
    out = normalize_messages(cell)
    assert out == arrow_msgs  # None-filled struct fields are gone, arrays are lists
    assert normalize_messages(json.dumps(msgs)) == msgs
    assert normalize_messages(msgs) == msgs
    assert normalize_messages({"role": "user", "content": "hi"}) == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("cell, match", [
    (None, "missing"), ("not json", "not valid JSON"), ("[]", "non-empty"),
    ([{"content": "no role"}], "role"), ([{"role": "user"}], "no content"),
    ([{"role": "user", "content": 5}], "content is a int"), ([["x"]], "not a dict"),
])
def test_normalize_messages_errors(cell, match):
    with pytest.raises(MessagesError, match=match):
        normalize_messages(cell)


def test_text_only_and_system_prompt():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert text_only_messages(msgs) == [{"role": "user", "content": "ab"}]
    with pytest.raises(MessagesError, match="text-only"):
        text_only_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    sp = with_system_prompt([{"role": "user", "content": "q"}], "You judge rules.")
    assert sp[0] == {"role": "system", "content": "You judge rules."} and len(sp) == 2
    own = [{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}]
    assert with_system_prompt(own, "other") == own


def test_normalize_sampling():
    assert normalize_sampling(None) == {} and normalize_sampling("") == {}
    assert normalize_sampling('{"temperature": 0.2, "seed": 7}') == {"temperature": 0.2, "seed": 7}
    assert normalize_sampling({"top_p": 0.9, "seed": None}) == {"top_p": 0.9}
    with pytest.raises(ValueError, match="unknown sampling keys"):
        normalize_sampling('{"temprature": 1}')
    with pytest.raises(ValueError, match="JSON object"):
        normalize_sampling("[1]")


# ----------------------------------------------------------------- repair and reject

def test_repair_messages_and_reject_reason():
    fmt = output_format(response_schema=BOX_SCHEMA)
    orig = [{"role": "user", "content": "Describe the box as JSON."}]
    conv = repair_messages(orig, "{label: box}", "invalid JSON: Expecting property name", fmt)
    assert conv[:1] == orig
    assert conv[1] == {"role": "assistant", "content": "{label: box}"}
    assert conv[2]["role"] == "user" and conv[2]["content"].startswith(REPAIR_MARKER)
    assert "Expecting property name" in conv[2]["content"]
    assert '"pattern": "^[a-z ]{1,12}$"' in conv[2]["content"]  # the schema is restated
    assert "corrected output only" in conv[2]["content"]
    reason = reject_reason("schema violation at score: too big", "x" * 3000, 3)
    assert "after 3 attempt(s)" in reason and "too big" in reason
    assert "raw output: " + "x" * 2000 in reason and "1000 more chars" in reason
