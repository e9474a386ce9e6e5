"""Varied JSON schemas (nested objects, arrays, enums, bounded numbers, optional fields, anyOf,
string patterns, $defs) with a prompt each, shared by the engine and server tests."""

from __future__ import annotations

NAME = {"type": "string", "minLength": 1, "maxLength": 24}

SCHEMAS: list[tuple[str, dict]] = [
    ("a person", {"type": "object", "properties": {"name": NAME, "age": {
        "type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]}),
    ("a city and its country", {"type": "object", "properties": {
        "city": NAME, "country": NAME}, "required": ["city", "country"],
        "additionalProperties": False}),
    ("a yes or no answer", {"type": "object", "properties": {"answer": {
        "type": "string", "enum": ["yes", "no"]}}, "required": ["answer"]}),
    ("a list of three fruits", {"type": "object", "properties": {"fruits": {
        "type": "array", "items": NAME, "minItems": 3, "maxItems": 3}},
        "required": ["fruits"]}),
    ("a temperature reading", {"type": "object", "properties": {
        "celsius": {"type": "number", "minimum": -50, "maximum": 60},
        "unit": {"const": "C"}}, "required": ["celsius", "unit"]}),
    ("a book with an optional subtitle", {"type": "object", "properties": {
        "title": NAME, "subtitle": NAME, "pages": {"type": "integer", "minimum": 1,
                                                   "maximum": 5000}},
        "required": ["title", "pages"]}),
    ("an address", {"type": "object", "properties": {"address": {
        "type": "object", "properties": {"street": NAME, "zip": {
            "type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["street", "zip"]}},
        "required": ["address"]}),
    ("a boolean flag", {"type": "object", "properties": {"enabled": {"type": "boolean"}},
                        "required": ["enabled"]}),
    ("a color as a hex code", {"type": "object", "properties": {"hex": {
        "type": "string", "pattern": "^#[0-9a-f]{6}$"}}, "required": ["hex"]}),
    ("an id that is a number or a string", {"type": "object", "properties": {"id": {
        "anyOf": [{"type": "integer", "minimum": 0, "maximum": 9999}, NAME]}},
        "required": ["id"]}),
    ("a point in 2D", {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -100, "maximum": 100},
        "y": {"type": "integer", "minimum": -100, "maximum": 100}}, "required": ["x", "y"]}),
    ("a list of scores", {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                     "maximum": 10}, "maxItems": 5}),
    ("a weekday", {"type": "string", "enum": ["Monday", "Tuesday", "Wednesday", "Thursday",
                                              "Friday"]}),
    ("a team of two people", {"type": "object", "properties": {"members": {
        "type": "array", "items": {"type": "object", "properties": {
            "name": NAME, "role": {"enum": ["lead", "dev"]}}, "required": ["name", "role"]},
        "minItems": 2, "maxItems": 2}}, "required": ["members"]}),
    ("a rating", {"type": "object", "properties": {"stars": {
        "type": "integer", "exclusiveMinimum": 0, "maximum": 5}, "comment": {
            "type": "string", "maxLength": 40}}, "required": ["stars"]}),
    ("a product", {"$defs": {"price": {"type": "number", "minimum": 0, "maximum": 1000}},
                   "type": "object", "properties": {"name": NAME, "price": {
                       "$ref": "#/$defs/price"}}, "required": ["name", "price"]}),
    ("a nullable middle name", {"type": "object", "properties": {"first": NAME, "middle": {
        "anyOf": [NAME, {"type": "null"}]}}, "required": ["first", "middle"]}),
    ("an email", {"type": "object", "properties": {"email": {
        "type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"}},
        "required": ["email"]}),
    ("a short sentence", {"type": "string", "maxLength": 60}),
    ("a matrix of two rows", {"type": "array", "items": {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2},
        "minItems": 2, "maxItems": 2}),
    ("an event with a date", {"type": "object", "properties": {"event": NAME, "date": {
        "type": "string", "format": "date"}}, "required": ["event", "date"]}),
    ("a settings object", {"type": "object", "properties": {
        "volume": {"type": "integer", "minimum": 0, "maximum": 11},
        "theme": {"enum": ["dark", "light"]}, "beta": {"type": "boolean"}},
        "required": ["volume", "theme", "beta"], "additionalProperties": False}),
]


def chat_for(description: str) -> list[dict]:
    return [{"role": "user", "content": f"Reply with JSON describing {description}."}]
