"""A constraint's grammar, built without a tokenizer: what the front-end checks (so a bad schema,
regex or grammar is a 400 before any token is generated) and what the engine then compiles.

xgrammar accepts some JSON Schema keywords without enforcing them (measured with its acceptor on
violating strings: `not`, `allOf` with several parts, `if`/`then`/`else`, `uniqueItems`,
`contains`, `dependentRequired`...). A schema using one is refused, naming it, because output
that silently ignores part of the schema is exactly what this package exists to prevent.
"""

from __future__ import annotations

import json
from typing import Any

from pagoda.loader.tokenizer import TextError, check_unicode
from pagoda.sampling.constraint import StructuredOutputs


class ConstraintError(ValueError):
    """A constraint that cannot be compiled; the message says why."""


# Keywords a schema may use that xgrammar does not enforce; `format` values are annotations in
# JSON Schema 2020-12 (validators ignore unknown ones too), so they are not listed.
UNENFORCED_KEYWORDS = frozenset({
    "not", "if", "then", "else", "uniqueItems", "contains", "minContains", "maxContains",
    "dependentRequired", "dependentSchemas", "dependencies", "$dynamicRef", "$recursiveRef",
})
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMAS = ("items", "additionalProperties", "propertyNames", "additionalItems")


# Objects and arrays nested in a schema, at most: the validators and grammar builders recurse
# once or more per level, and a 4 KB schema nested 240 deep exhausted Python's stack (a 500).
# Real schemas stay far below (a property 30 models deep is 60 levels).
MAX_SCHEMA_NESTING = 100


def nesting(value: Any) -> int:
    """How deeply objects and arrays nest in a JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(
            item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_nesting(schema: Any, what: str = "JSON schema") -> None:
    if nesting(schema) > MAX_SCHEMA_NESTING:
        raise ConstraintError(f"{what} nests objects and arrays more than "
                              f"{MAX_SCHEMA_NESTING} levels deep")


def check_schema(schema: Any, path: str = "#") -> None:
    """Raise ConstraintError for an invalid JSON Schema or one xgrammar would not enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ConstraintError(f"invalid JSON schema at {path}: expected an object or a boolean")
    if path == "#":
        import jsonschema

        check_nesting(schema)
        if not isinstance(schema.get("$schema", ""), str):
            raise ConstraintError("invalid JSON schema: '$schema' must be a string")
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ConstraintError(f"invalid JSON schema: {exc.message}") from None
    ref = schema.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        # a remote or relative reference is never fetched: its part of the schema would go
        # unenforced
        raise ConstraintError(f"JSON schema '$ref' {ref!r} at {path} is not supported: only "
                              "references within the schema ('#/...') are")
    for key in UNENFORCED_KEYWORDS.intersection(schema):
        if key == "uniqueItems" and not schema[key]:
            continue
        raise ConstraintError(f"JSON schema keyword {key!r} at {path} is not supported "
                              "by the grammar engine")
    if len(schema.get("allOf", ())) > 1:
        raise ConstraintError(f"JSON schema keyword 'allOf' with several schemas at {path} is "
                              "not supported by the grammar engine; merge them into one")
    for key in SUBSCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            check_schema(sub, f"{path}/{key}/{name}")
    for key in SUBSCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or ()):
            check_schema(sub, f"{path}/{key}/{i}")
    for key in SUBSCHEMAS:
        if isinstance(schema.get(key), (dict, bool)):
            check_schema(schema[key], f"{path}/{key}")


def is_lark(constraint: StructuredOutputs) -> bool:
    """A grammar without EBNF's `::=` rules is Lark (`start: ...`), which llguidance reads."""
    return constraint.kind == "grammar" and "::=" not in constraint.value


class LarkGrammar:
    """A Lark grammar, checked by llguidance (xgrammar reads EBNF only; llguidance's masks are
    slower, so it serves only what xgrammar cannot: docs/structured_output.md)."""

    def __init__(self, source: str):
        self.source = source

    @classmethod
    def checked(cls, source: str) -> LarkGrammar:
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_lark(source)
        error = llguidance.LLMatcher.validate_grammar(grammar)
        if error:
            raise ConstraintError(f"invalid Lark grammar: {error.strip().splitlines()[0]}")
        return cls(grammar)


def build_grammar(constraint: StructuredOutputs) -> Any:
    """The constraint as an `xgrammar.Grammar` (or a `LarkGrammar`); raises ConstraintError
    with the reason."""
    import xgrammar as xgr

    kind, value = constraint.kind, constraint.value
    if kind == "json":
        check_schema(constraint.schema)
    if is_lark(constraint):
        return LarkGrammar.checked(value)
    try:
        if kind == "json":
            return _json_grammar(xgr, value)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False,
                                                strict_mode=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(value)
        if kind == "choice":
            options = constraint.options
            if not options or not all(isinstance(o, str) and o for o in options):
                raise ConstraintError("choice must be a non-empty list of non-empty strings")
            try:
                for option in options:
                    check_unicode(option)
            except TextError:
                raise ConstraintError("choice strings must be valid Unicode (a lone surrogate "
                                      "is not)") from None
            # the characters themselves: json.dumps's default \uXXXX escapes would spell a
            # character outside the BMP as two surrogates, which xgrammar reads as two
            # (invalid) characters
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(
                json.dumps(o, ensure_ascii=False) for o in options))
        return xgr.Grammar.from_ebnf(value)
    except ConstraintError:
        raise
    except (RuntimeError, ValueError) as exc:
        # xgrammar prefixes "[time] /path/file.cc:line: "; the client needs only the reason
        reason = str(exc).strip().split(": ", 1)[-1] if ".cc:" in str(exc) else str(exc)
        raise ConstraintError(f"invalid {kind} constraint: {reason}") from None


def _json_grammar(xgr: Any, schema: str) -> Any:
    """No free whitespace, and nothing the schema does not name (xgrammar's strict mode: no
    unnamed properties or items). Small models otherwise pad JSON with newlines, or invent
    properties, until max_tokens; the output stays valid under the schema either way. A schema
    that strict mode cannot satisfy (an array with minItems but no items) compiles permissively.
    """
    try:
        return xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
    except RuntimeError:
        return xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=False)
