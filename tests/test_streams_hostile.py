"""Hostile content: whatever the bytes, the decoder returns an event or raises InvalidEvent, nothing else."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from kafka import TopicPartition
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder

from streams.records import SUPPORTED, RawPartitionRecords
from streams.schemas import (MAX_JSON_DEPTH, REASONS, InvalidEvent, decode_event, decode_valid_events, encode_event,
                             nesting_depth)
from tests.test_streams_pipeline import NOW, click_dict, valid_events

ORDER = {"type": "order", "event_id": "o1", "order_id": "o1", "merchant_id": "m00", "user_id": "u1",
         "timestamp": 1_700_000_000.0, "currency": "EUR", "items": [{"item_id": "i1", "quantity": 2, "unit_price": 3.0}]}


def nested(depth: int, inner: bytes = b"1", kind: str = "object") -> bytes:
    if kind == "object":
        return b'{"a":' * depth + inner + b"}" * depth
    return b"[" * depth + inner + b"]" * depth


def outcome(raw: bytes | str):
    """The event, or the reason; anything else raised fails the test."""
    try:
        return decode_event(raw, now=NOW)
    except InvalidEvent as bad:
        assert bad.reason in REASONS, bad.reason
        return bad.reason


def test_a_thousand_levels_of_nesting_is_too_deep_not_a_recursion_error():
    poison = nested(1000)
    assert len(poison) < 8_000
    assert outcome(poison) == "too_deep"
    assert decode_valid_events([poison, encode_event(valid_events(5)[0])], now=NOW) is None


@pytest.mark.parametrize("where", ["top", "query", "items", "unknown_field_after_type"])
def test_deep_nesting_anywhere_is_too_deep_whatever_msgspec_trips_on_first(where):
    deep = nested(MAX_JSON_DEPTH + 1, kind="array")
    payloads = {"top": deep,
                "query": msgspec.json.encode(click_dict(query=None)).replace(b'"query":null', b'"query":' + deep),
                "items": msgspec.json.encode(ORDER).replace(b'"items":[', b'"items":[' + deep + b","),
                "unknown_field_after_type": b'{"type":"click","x":' + nested(5000) + b"}"}
    assert outcome(payloads[where]) == "too_deep"
    assert outcome(nested(MAX_JSON_DEPTH, kind="array")) == "not_an_object"  # at the limit: the usual reason


def test_any_bytes_like_payload_is_decoded_or_rejected_alike():
    for raw in (nested(100), b"\xff", encode_event(_VALID[0])):
        assert outcome(memoryview(raw)) == outcome(bytearray(raw)) == outcome(raw)


def test_nesting_depth_ignores_brackets_in_strings_and_counts_unclosed_ones():
    assert nesting_depth(b'{"a": [[1], {"b": "[[[[\\"{{"}]}') == 3
    assert nesting_depth(b"[" * 100) == 100
    assert nesting_depth(b"]]]") == 0 and nesting_depth(b"") == 0


@pytest.mark.parametrize("field, value, reason", [
    ("position", "9" * 5000, "out_of_range"),  # a 5,000-digit integer
    ("position", "9" * 4000, "out_of_range"),
    ("timestamp", "1e999", "out_of_range"),  # overflows a double
    ("timestamp", "NaN", "malformed_json"),
    ("timestamp", "-Infinity", "malformed_json"),
    ("timestamp", "1e300", "future_timestamp"),
    ("event_id", '"\\ud800"', "malformed_json"),  # an escaped lone surrogate
    ("query", '"' + "q" * 900_000 + '"', None),  # long, but within the size limit: valid
    ("event_id", '"' + "e" * 129 + '"', "out_of_range"),
], ids=["5000-digit-int", "4000-digit-int", "1e999", "NaN", "-Infinity", "1e300", "lone-surrogate", "900k-string",
        "129-char-id"])
def test_hostile_values_in_allowed_fields_have_reasons(field, value, reason):
    raw = msgspec.json.encode(click_dict(**{field: "PLACEHOLDER"})).replace(b'"PLACEHOLDER"', value.encode())
    result = outcome(raw)
    assert result == reason if reason else not isinstance(result, str)


@pytest.mark.parametrize("text, reason", [("\ud800", "not_utf8"), ('{"type": "click", "query": "\udcff"}', "not_utf8"),
                                          (json.dumps(click_dict(query="\u00e9")), None)])
def test_text_payloads_with_lone_surrogates_are_not_utf8(text, reason):
    result = outcome(text)
    assert result == reason if reason else result.query == "\u00e9"


# -- fuzzing: >= 10k generated inputs, derandomized, through the one-by-one and the bulk path ------------------

chars = st.characters(exclude_categories=()) | st.characters(categories=["Cs"])  # lone surrogates too
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(chars, max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
fields = st.sampled_from(sorted(click_dict()) + sorted(ORDER) + ["items", "query", "referrer", "brand", "zzz"])


def _with(base: dict, field: str, value) -> bytes:
    return json.dumps({**base, field: value}).encode("utf-8", "surrogatepass")


@st.composite
def hostile_payloads(draw) -> list[bytes | str]:
    """A few hostile payloads built around one drawn value (so that each draw gives several inputs)."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        junk = draw(st.binary(max_size=120))
        return [junk, junk + encode_event(_VALID[0]), encode_event(_VALID[1])[:-1] + junk]
    if kind == 1:  # any JSON (NaN/Infinity, huge integers, lone surrogates) alone and in every place of an event
        value, field = draw(json_values), draw(fields)
        return [json.dumps(value).encode("utf-8", "surrogatepass"), _with(click_dict(), field, value),
                _with(ORDER, field, value), _with(ORDER, "items", [value]),
                _with(ORDER, "items", [{**ORDER["items"][0], "quantity": value}])]
    if kind == 2:  # deep nesting, alone, inside an event, cut short
        depth = draw(st.integers(0, 3000))
        deep = [nested(depth), nested(depth, kind="array")]
        return [*deep, b'{"type":"order","items":' + deep[1] + b"}", deep[0][: len(deep[0]) // 2]]
    if kind == 3:  # text (lone surrogates included) as a str payload and inside one
        text = draw(st.text(chars, max_size=60))
        return [text, json.dumps({**click_dict(), "query": text}), json.dumps({**click_dict(), text: 1})]
    raw = bytearray(encode_event(draw(st.sampled_from(_VALID))))  # a valid event with a few bytes changed
    for _ in range(draw(st.integers(1, 3))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return [bytes(raw)]


_VALID = valid_events(30, seed=11)
_EXAMPLES = 340  # x 10 draws x ~3 payloads: > 10,000 inputs
_SEEN = {"inputs": 0, "valid": 0}


@settings(max_examples=_EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(hostile_payloads(), min_size=10, max_size=10))
def _fuzz_decoders(groups):
    payloads = [payload for group in groups for payload in group]
    results = [outcome(raw) for raw in payloads]
    raws = [raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw for raw in payloads]
    bulk = decode_valid_events(raws, now=NOW)  # only raises what a test failure shows
    one_by_one = [outcome(raw) for raw in raws]
    assert one_by_one == results
    if bulk is not None:
        assert bulk == one_by_one
    else:
        assert any(isinstance(result, str) for result in one_by_one)
    mixed = decode_valid_events([encode_event(event) for event in _VALID[:3]] + raws, now=NOW)
    assert (mixed is None) == (bulk is None)  # all or nothing, valid ones around or not
    _SEEN["inputs"] += len(payloads)
    _SEEN["valid"] += sum(not isinstance(result, str) for result in results)


def test_fuzzed_payloads_only_ever_give_an_event_or_invalid_event():
    """decode_event and decode_valid_events on > 10k generated hostile inputs (seeded: derandomized)."""
    _SEEN.update(inputs=0, valid=0)
    _fuzz_decoders()
    assert _SEEN["inputs"] >= 10_000 and _SEEN["valid"] > 0, _SEEN


@pytest.mark.skipif(not SUPPORTED, reason="kafka-python internals differ from the pinned version")
def test_fuzzed_values_through_the_fast_record_parser_decode_or_are_invalid():
    """The consumer's path: values as the fast parser hands them out, decoded in bulk, else one by one."""
    hostile = [nested(1000), nested(3000, kind="array"), b"\xff" * 10, b"", None, "\ud800".encode("utf-8", "surrogatepass"),
               b'{"type":"click","position":' + b"9" * 4000 + b"}", *map(encode_event, _VALID[:5])]
    builder = MemoryRecordsBuilder(2, 0, 1 << 22, offset=0)
    for value in hostile:
        assert builder.append(1_700_000_000_000, b"m00", value, []) is not None
    builder.close()
    records = RawPartitionRecords(0, TopicPartition("t", 0), MemoryRecords(bytes(builder.buffer()))).take(None)
    values = [record.value for record in records]
    assert values == hostile and decode_valid_events(values, now=NOW) is None
    reasons = [outcome(value or b"") for value in values]
    assert reasons[:7] == ["too_deep", "too_deep", "not_utf8", "malformed_json", "malformed_json", "not_utf8",
                           "out_of_range"]
    assert decode_valid_events(values[7:], now=NOW) == reasons[7:]
