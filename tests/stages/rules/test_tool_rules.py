"""Rules of DESIGN A4: tool-call ids, capabilities, structured output, request validation, cache keys."""

from __future__ import annotations

import base64
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.runtime.config import config_from_mapping, preset
from schemas.request import AIRequest, FunctionCall, JsonSchemaFormat, ResponseFormat, ToolCall
from stages.rules.cache_key import cache_key
from stages.rules.catalog import deployment_lacks, model_info
from stages.rules.images import ImageError, decode_data_uri, reference_for
from stages.rules.structured import answer_problem, schema_problems, tool_choice_problem
from stages.rules.tool_ids import TOOL_CALL_ID_PATTERN, sanitize_tool_call_id, synthesized_tool_call_id

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def req(**fields: Any) -> AIRequest:
    data: dict[str, Any] = {"id": "r", "model": "chat-large", "messages": [{"role": "user", "content": "hi"}]}
    data.update(fields)
    return msgspec.convert(data, AIRequest)


# --- tool-call ids ------------------------------------------------------------------------------


@given(st.text(max_size=120))
def test_every_id_is_sanitised_to_one_shape_idempotently(raw: str) -> None:
    once = sanitize_tool_call_id(raw)
    assert TOOL_CALL_ID_PATTERN.match(once)
    assert sanitize_tool_call_id(once) == once


@given(st.text(max_size=60), st.text(max_size=60))
def test_different_ids_never_share_a_sanitised_id(a: str, b: str) -> None:
    if a != b:
        assert sanitize_tool_call_id(a) != sanitize_tool_call_id(b)


def test_provider_ids_pass_unchanged_and_others_are_rewritten_the_same_everywhere() -> None:
    for native in ("call_abc123XYZ", "toolu_01A09q90qw90lq917835lq9"):
        assert sanitize_tool_call_id(native) == native
    odd = "functions.get_weather:0"  # the shape some OpenAI-compatible servers use
    assert sanitize_tool_call_id(odd) == sanitize_tool_call_id(odd) != odd
    assert len(sanitize_tool_call_id("x" * 41)) == 40
    assert synthesized_tool_call_id("f", "{}", 0) == synthesized_tool_call_id("f", "{}", 0)
    assert synthesized_tool_call_id("f", "{}", 0) != synthesized_tool_call_id("f", "{}", 1)


# --- request validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "object"),
        ({"tools": [TOOL, TOOL]}, "same name"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [TOOL]}, "not in `tools`"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}}, "object"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}]},
            "https URL",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/x,a"}}]}]},
            "data:image",
        ),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "4"}]}, "tool_call_id"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "c9", "content": "4"}]},
            "answers no tool call",
        ),
        ({"messages": [{"role": "user", "content": None}]}, "may be null only"),
        (
            {
                "messages": [
                    {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "https://a"}}]}
                ]
            },
            "user messages only",
        ),
    ],
)
def test_bad_tool_and_image_requests_are_refused_with_a_clear_error(fields: dict[str, Any], text: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        req(**fields)
    assert text in str(info.value)


def test_an_assistant_turn_of_tool_calls_with_null_content_is_a_valid_history_turn() -> None:
    r = req(
        messages=[
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        tools=[TOOL],
    )
    assert r.needs() == frozenset({"tools"})


# --- capabilities -------------------------------------------------------------------------------


def test_capabilities_follow_the_catalog_and_the_deployment_setting() -> None:
    config = preset("production")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://a/b.png"}}]}]
    assert deployment_lacks(config, "cloudflare", "@cf/meta/llama-3.1-8b-instruct", req(tools=[TOOL])) == "tools"
    assert deployment_lacks(config, "openai", "gpt-3.5-turbo", req(messages=image)) == "vision"
    assert deployment_lacks(config, "openai", "gpt-4o-mini", req(messages=image)) is None
    vision_cf = "@cf/meta/llama-3.2-11b-vision-instruct"
    assert deployment_lacks(config, "cloudflare", vision_cf, req(messages=image)) == "image_urls"
    data_image = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}
    ]
    assert deployment_lacks(config, "cloudflare", vision_cf, req(messages=data_image)) is None
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert deployment_lacks(config, "openai", "gpt-3.5-turbo", req(response_format=schema)) == "json_schema"
    assert deployment_lacks(config, "openai", "unlisted-model", req(tools=[TOOL])) is None  # unknown: assumed able
    # the seed's provider `capabilities` restricts further once it names one of DESIGN A4's capabilities
    restricted = config_from_mapping({"providers": {"openai": {"capabilities": ["chat", "vision"]}}}, base=config)
    assert deployment_lacks(restricted, "openai", "gpt-4o", req(tools=[TOOL])) == "tools"
    seed_default = config_from_mapping(
        {"providers": {"openai": {"capabilities": ["text-generation", "chat"]}}}, base=config
    )
    assert deployment_lacks(seed_default, "openai", "gpt-4o", req(tools=[TOOL])) is None
    info = model_info("anthropic", "claude-sonnet-4-20250514")
    assert info is not None and info.tools and info.vision and info.json_schema and info.source.startswith("https://")


# --- structured output --------------------------------------------------------------------------


def fmt(schema: Any) -> ResponseFormat:
    return msgspec.convert({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}, ResponseFormat)


def test_structured_answers_are_validated_against_their_schema() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}, "required": ["n"]}
    assert answer_problem(fmt(schema), '{"n": 3}') is None
    assert answer_problem(fmt(schema), '{"n": -1}') == "$.n: -1 is less than the minimum of 0"
    assert answer_problem(fmt(schema), "{}") == "$: 'n' is a required property"
    assert (answer_problem(fmt(schema), "Sure! {") or "").startswith("not JSON")
    json_object = msgspec.convert({"type": "json_object"}, ResponseFormat)
    assert answer_problem(json_object, "[1]") == "not a JSON object" and answer_problem(json_object, "{}") is None
    assert answer_problem(None, "anything") is None
    bad = fmt({"type": "integer", "minimum": "zero"})
    assert isinstance(bad, JsonSchemaFormat) and "not a valid JSON Schema" in (schema_problems(bad) or "")


# --- images -------------------------------------------------------------------------------------


def test_data_uris_are_checked_and_named_by_their_hash() -> None:
    media, raw = decode_data_uri(f"data:image/png;base64,{PNG}")
    assert media == "image/png" and raw.startswith(b"\x89PNG")
    assert reference_for(media, raw) == reference_for("image/png", bytes(raw))
    assert reference_for(media, raw) != reference_for(media, raw + b"\x00")
    with pytest.raises(ImageError, match="media type"):
        decode_data_uri(f"data:image/bmp;base64,{PNG}")
    with pytest.raises(ImageError, match="base64"):
        decode_data_uri("data:image/png;base64,@@@")
    with pytest.raises(ImageError, match="over the limit"):
        decode_data_uri(f"data:image/png;base64,{PNG}", max_bytes=4)


# --- cache keys ---------------------------------------------------------------------------------


def test_each_new_field_changes_the_cache_key_and_an_image_is_keyed_by_its_hash() -> None:
    base = req()
    variants = [
        req(tools=[TOOL]),
        req(tools=[TOOL], tool_choice="required"),
        req(tools=[TOOL], parallel_tool_calls=False),
        req(response_format={"type": "json_object"}),
        req(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}),
        req(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://a/1.png"}}]}]),
        req(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://a/2.png"}}]}]),
    ]
    keys = {cache_key(base), *(cache_key(v) for v in variants)}
    assert len(keys) == len(variants) + 1
    data_uri = f"data:image/png;base64,{PNG}"
    media, raw = decode_data_uri(data_uri)
    inline = req(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri}}]}])
    ref = reference_for(media, raw)
    stored = req(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ref}}]}])
    assert cache_key(inline) == cache_key(stored)
    other = base64.b64encode(raw + b"\x01").decode()
    changed = req(
        messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{other}"}}]}
        ]
    )
    assert cache_key(changed) != cache_key(inline)
    tool_turns = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"A"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    cloudy = [*tool_turns[:2], {**tool_turns[2], "content": "cloudy"}]
    assert cache_key(req(messages=tool_turns, tools=[TOOL])) != cache_key(req(messages=cloudy, tools=[TOOL]))


def test_schemas_never_reach_outside_themselves_and_bad_ones_are_named() -> None:
    local = {"type": "object", "$defs": {"n": {"type": "integer"}}, "properties": {"a": {"$ref": "#/$defs/n"}}}
    assert schema_problems(fmt(local)) is None
    assert answer_problem(fmt(local), '{"a": "x"}') == "$.a: 'x' is not of type 'integer'"
    for ref in ("http://127.0.0.1:9/x.json", "file:///etc/passwd", "other.json", "urn:x"):
        problem = schema_problems(fmt({"type": "object", "properties": {"a": {"$ref": ref}}}))
        assert problem is not None and "only references inside the schema" in problem
    assert "does not resolve" in (schema_problems(fmt({"$ref": "#/$defs/missing"})) or "")
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(80):
        deep = {"type": "object", "properties": {"a": deep}}
    assert "nested deeper" in (schema_problems(fmt(deep)) or "")
    tool = req(
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "minProperties": "x"}}}]
    )
    assert "tools[0].function.parameters" in (schema_problems(None, tool.tools) or "")


def test_an_answer_must_hold_to_a_forced_tool_choice() -> None:
    calls = [ToolCall(id="c", function=FunctionCall(name="get_weather", arguments="{}"))]
    two = [TOOL, {"type": "function", "function": {"name": "get_time"}}]
    assert tool_choice_problem(req(tools=[TOOL], tool_choice="required"), None) is not None
    assert tool_choice_problem(req(tools=[TOOL], tool_choice="required"), calls) is None
    assert tool_choice_problem(req(tools=[TOOL], tool_choice="none"), calls) is not None
    named = req(tools=two, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert tool_choice_problem(named, calls) == "tool_choice names 'get_time' but the answer called 'get_weather'"
    assert tool_choice_problem(req(tools=[TOOL], tool_choice="auto"), None) is None
    assert named.needs() == frozenset({"tools", "tool_choice"})
