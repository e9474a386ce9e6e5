"""Constraint checks that need no model: what compiles, what is refused and why."""

from __future__ import annotations

import pytest

from pagoda.sampling.constraint import StructuredOutputs
from pagoda.structured_output.grammar import ConstraintError, build_grammar
from tests.structured_output.schemas import SCHEMAS


@pytest.mark.parametrize("schema", [s for _, s in SCHEMAS], ids=[d for d, _ in SCHEMAS])
def test_every_test_schema_compiles(schema):
    build_grammar(StructuredOutputs.json_schema(schema))


@pytest.mark.parametrize("schema, reason", [
    ({"type": "objectx"}, "invalid JSON schema"),
    ({"type": "integer", "not": {"const": 3}}, "'not'"),
    ({"type": "array", "uniqueItems": True}, "'uniqueItems'"),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "'allOf'"),
    ({"type": "object", "properties": {"a": {"if": {"type": "string"}}}},
     "'if' at #/properties/a"),
    ({"$ref": "#/$defs/missing"}, "invalid json constraint"),
    # not a schema at all (guided_json "5" / "null"), or an unhashable $schema: a 400, not a 500
    (5, "expected an object or a boolean"),
    (None, "expected an object or a boolean"),
    ({"$schema": []}, "'\\$schema' must be a string"),
    # a reference that would be fetched is never enforced: refused, wherever it sits
    ({"$ref": "http://example.com/s.json"}, "only references within the schema"),
    ({"type": "object", "properties": {"a": {"$ref": "other.json#/a"}}},
     "'other.json#/a' at #/properties/a"),
])
def test_bad_or_unenforceable_schemas_are_refused_with_the_reason(schema, reason):
    with pytest.raises(ConstraintError, match=reason):
        build_grammar(StructuredOutputs.json_schema(schema))


@pytest.mark.parametrize("constraint, reason", [
    (StructuredOutputs("regex", "[a-"), "Unclosed"),
    (StructuredOutputs("grammar", 'root ::= "a" |'), "invalid grammar"),
    (StructuredOutputs("grammar", 'start: "a" | undefined_rule'), "invalid Lark grammar"),
    (StructuredOutputs("grammar", 'start: ( "a"'), "invalid Lark grammar"),
    (StructuredOutputs.choice([]), "non-empty list"),
    (StructuredOutputs.choice(["ok", "\ud800"]), "valid Unicode"),
])
def test_bad_regex_grammar_choice_are_refused(constraint, reason):
    with pytest.raises(ConstraintError, match=reason):
        build_grammar(constraint)


def test_false_unique_items_and_a_single_all_of_are_fine():
    build_grammar(StructuredOutputs.json_schema(
        {"type": "array", "uniqueItems": False, "items": {"allOf": [{"type": "integer"}]}}))


def test_cache_key_follows_content_and_property_order():
    a = StructuredOutputs.json_schema({"properties": {"x": {}, "y": {}}})
    assert a.key == StructuredOutputs.json_schema('{"properties": {"x": {}, "y": {}}}').key
    assert a.key != StructuredOutputs.json_schema({"properties": {"y": {}, "x": {}}}).key
    assert StructuredOutputs("regex", "a").key != StructuredOutputs("grammar", "a").key


def test_schema_needing_unnamed_items_compiles_permissively():
    from xgrammar.testing import _is_grammar_accept_string

    grammar = build_grammar(StructuredOutputs.json_schema({"type": "array", "minItems": 2}))
    assert _is_grammar_accept_string(grammar, '[1, "a"]')
    named = build_grammar(StructuredOutputs.json_schema({"type": "object", "properties": {
        "a": {"type": "integer"}}}))
    assert _is_grammar_accept_string(named, '{"a": 1}')
    assert not _is_grammar_accept_string(named, '{"a": 1, "b": 2}')  # nothing unnamed
    assert not _is_grammar_accept_string(named, '{ "a": 1 }')  # no free whitespace


def test_lark_grammars_go_to_llguidance_and_ebnf_to_xgrammar():
    from pagoda.structured_output.grammar import LarkGrammar

    assert isinstance(build_grammar(StructuredOutputs("grammar", 'start: "a" | "b"')),
                      LarkGrammar)
    assert not isinstance(build_grammar(StructuredOutputs("grammar", 'root ::= "a"')),
                          LarkGrammar)


def test_choice_outside_the_basic_plane_is_its_own_characters():
    """An emoji is one character of the grammar (its UTF-8 bytes), not two escaped surrogates."""
    from xgrammar.testing import _is_grammar_accept_string

    grammar = build_grammar(StructuredOutputs.choice(["\U0001f600", 'say "hi"\n', "café"]))
    for option in ("\U0001f600", 'say "hi"\n', "café"):
        assert _is_grammar_accept_string(grammar, option), option
    assert not _is_grammar_accept_string(grammar, "\\ud83d\\ude00")
