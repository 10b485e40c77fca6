"""Structured output from the command line: `haifctl infer --json` with a JSON schema, a
response_format or a GBNF grammar, in-process (the cluster's path is tested through the bridge)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from tests.e2e.conftest import Run

PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "kind": {"enum": ["cat", "dog"]},
        "legs": {"type": "integer"},
    },
    "required": ["name", "kind", "legs"],
    "additionalProperties": False,
}


def test_infer_json_payload_with_a_schema_gives_valid_json(haifctl: Run, tmp_path: Path) -> None:
    for i, constraint in enumerate(
        (
            {"json_schema": PET},
            {"response_format": {"type": "json_schema", "json_schema": {"schema": PET}}},
        )
    ):
        payload = tmp_path / f"p{i}.json"
        payload.write_text(json.dumps({"prompt": "A pet:", "max_tokens": 200, **constraint}))
        for seed in ("1", "2"):
            proc = haifctl("infer", "--local", "--json", str(payload), "--seed", seed)
            assert proc.returncode == 0, proc.stderr
            jsonschema.validate(json.loads(proc.stdout), PET)


def test_infer_json_payload_with_a_grammar(haifctl: Run, tmp_path: Path) -> None:
    payload = tmp_path / "yes.json"
    payload.write_text(json.dumps({"prompt": "Rain?", "grammar": 'root ::= "yes" | "no"'}))
    proc = haifctl("infer", "--local", "--json", str(payload), "-o", "json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"] in ("yes", "no")


def test_unsupported_schemas_and_bad_grammars_are_one_line_errors(
    haifctl: Run, tmp_path: Path
) -> None:
    for body, says in (
        ({"json_schema": {"type": "integer", "minimum": 1}}, "'minimum' is not supported"),
        ({"grammar": "root ::= ("}, "grammar: llama.cpp could not parse it"),
        ({"grammar": 'root ::= "a"', "json_schema": PET}, "give one of"),
    ):
        payload = tmp_path / "bad.json"
        payload.write_text(json.dumps({"prompt": "x", **body}))
        proc = haifctl("infer", "--local", "--json", str(payload))
        assert proc.returncode == 2, proc.stderr
        assert says in proc.stderr
        assert proc.stdout == ""
