"""What a request's output must match: the structured-output constraint carried by
`SamplingParams` (vLLM's `StructuredOutputsParams`).

Exactly one kind is set. The engine compiles it into a grammar (`structured_output/`); this module
only holds the request's words and a stable key for the compiled-grammar cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputs:
    kind: str  # one of KINDS
    # json: the schema as canonical JSON text; regex / grammar: the source; choice: JSON list of
    # the allowed strings; json_object: "" (any JSON object)
    value: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown constraint kind {self.kind!r}; expected one of {KINDS}")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> StructuredOutputs:
        if isinstance(schema, str):
            schema = json.loads(schema)
        # key order kept: properties are generated in the order the schema lists them
        return cls("json", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def choice(cls, options: list[str]) -> StructuredOutputs:
        return cls("choice", json.dumps(list(options)))

    @property
    def schema(self) -> dict[str, Any] | None:
        return json.loads(self.value) if self.kind == "json" else None

    @property
    def options(self) -> list[str]:
        return json.loads(self.value) if self.kind == "choice" else []

    @property
    def key(self) -> str:
        """Identical constraints share one compiled grammar."""
        text = f"{self.kind}\0{self.value}"
        return hashlib.sha256(text.encode()).hexdigest()
