"""nova.structured: specs, the grammar compiler and its cache, matchers and batch bitmasks,
with the demo model's real tokenizer (no model weights run here)."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch
from structured_schemas import SCHEMAS

from nova.runtime.sampler import sample
from nova.sampling_params import SamplingParams
from nova.structured import GrammarError, GrammarSpec
from nova.structured.compiler import GrammarCompiler
from nova.structured.matcher import allocate_bitmask, allowed_token_ids, fill_bitmasks
from nova.structured.spec import generation_schema

EOS = 2  # SmolLM2's <|im_end|>
EXTRA_EOS = 0  # <|endoftext|>, passed as a second EOS id
VOCAB = 49153  # the demo model's logits width


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from nova.models.demo import build_demo_model

    return AutoTokenizer.from_pretrained(build_demo_model())


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, VOCAB, [EOS, EXTRA_EOS])


def walk(compiler, tokenizer, grammar, seed: int, max_steps: int = 400) -> tuple[str, bool]:
    """Decode under the grammar from random logits (the sampler applies the mask); returns the
    text and whether the grammar finished (only EOS allowed, EOS sampled)."""
    g = torch.Generator().manual_seed(seed)
    m = grammar.new_matcher()
    params = [SamplingParams(max_tokens=max_steps)]
    out: list[int] = []
    for _ in range(max_steps):
        mask = fill_bitmasks([m], VOCAB)
        logits = torch.randn(1, VOCAB, generator=g) * 3
        # make EOS likely once allowed, so random walks end
        logits[0, EOS] += 6.0
        [tok] = sample(logits, params, [None], allowed_token_bitmask=torch.from_numpy(mask))
        assert m.consume(tok), m.error
        if tok in (EOS, EXTRA_EOS):
            return tokenizer.decode(out), True
        out.append(tok)
    return tokenizer.decode(out), False


# -- specs ------------------------------------------------------------------------------------
def test_spec_constructors_validate_their_input():
    assert GrammarSpec.json_schema('{"type": "integer"}').source == '{"type":"integer"}'
    assert GrammarSpec.json_schema(True).source == "{}"
    with pytest.raises(GrammarError, match="not valid JSON"):
        GrammarSpec.json_schema("{nope")
    with pytest.raises(GrammarError, match="must be an object"):
        GrammarSpec.json_schema([1, 2])
    with pytest.raises(GrammarError, match="empty"):
        GrammarSpec.regex("")
    with pytest.raises(GrammarError, match="non-empty strings"):
        GrammarSpec.choice(["a", ""])
    with pytest.raises(GrammarError, match="unknown grammar kind"):
        GrammarSpec("xml", "<a/>")  # type: ignore[arg-type]


def test_key_order_is_kept_in_the_cache_key():
    a = GrammarSpec.json_schema({"properties": {"a": {}, "b": {}}})
    b = GrammarSpec.json_schema({"properties": {"b": {}, "a": {}}})
    assert a != b  # properties are generated in schema order: two different grammars


def test_generation_schema_closes_declared_objects_and_bounds_fractions():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"x": {"type": "integer"}}},
            "b": {"type": "object"},  # a free-form map stays open
            "c": {"type": "object", "properties": {}, "additionalProperties": True},
            "d": {"type": "array", "items": {"properties": {"y": {}}}},
            "e": {"anyOf": [{"properties": {"z": {}}}, {"type": "null"}]},
        },
        "$defs": {"P": {"properties": {"q": {}}}},
    }
    out = generation_schema(schema)
    assert out["additionalProperties"] is False
    props = out["properties"]
    assert props["a"]["additionalProperties"] is False
    assert "additionalProperties" not in props["b"]
    assert props["c"]["additionalProperties"] is True
    assert props["d"]["items"]["additionalProperties"] is False
    assert props["e"]["anyOf"][0]["additionalProperties"] is False
    assert out["$defs"]["P"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the input is not changed
    with_all_of = {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}
    assert generation_schema(with_all_of) == with_all_of  # closing would forbid a or b
    numbers = generation_schema(
        {
            "type": "array",
            "items": {"anyOf": [{"type": "number"}, {"type": ["number", "null"]}]},
            "prefixItems": [{"type": "number", "multipleOf": 0.5}, {"type": "integer"}],
        }
    )
    assert [b["multipleOf"] for b in numbers["items"]["anyOf"]] == [1e-6, 1e-6]
    assert numbers["prefixItems"] == [{"type": "number", "multipleOf": 0.5}, {"type": "integer"}]


def test_generated_numbers_have_at_most_six_fraction_digits(compiler, tokenizer):
    g = compiler.compile(GrammarSpec.json_schema({"type": "number", "minimum": 0, "maximum": 9}))

    def accepts(text: str) -> bool:
        m = g.new_matcher()
        return all(m.consume(t) for t in tokenizer.encode(text)) and m.is_accepting

    assert accepts("1.258888") and accepts("3") and not accepts("1.2588888")


# -- compiler -----------------------------------------------------------------------------------
def test_compile_is_cached_by_spec(compiler):
    spec = GrammarSpec.json_schema(
        {"type": "object", "properties": {"cached": {"type": "integer"}}}
    )
    before = compiler.num_compiled
    g1 = compiler.compile(spec)
    g2 = compiler.compile(GrammarSpec.json_schema(json.loads(spec.source)))
    assert g1 is g2
    assert compiler.num_compiled == before + 1


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (GrammarSpec.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
        (GrammarSpec.json_schema({"properties": {"a": {"$ref": "#/$defs/Gone"}}}), "Gone"),
        (GrammarSpec.json_schema({"type": "string", "format": "foo-bar"}), "foo-bar"),
        (GrammarSpec.regex("(unclosed"), "unclosed"),
        (GrammarSpec.grammar("start: missing_rule"), "missing_rule"),
    ],
)
def test_a_grammar_the_engine_cannot_compile_is_an_error_naming_the_problem(
    compiler, spec, fragment
):
    before = compiler.num_compiled
    for _ in range(2):  # the failure is cached too
        with pytest.raises(GrammarError, match=fragment):
            compiler.compile(spec)
    assert compiler.num_compiled == before + 1


def test_the_cache_keeps_the_most_recent_entries(tokenizer):
    c = GrammarCompiler(tokenizer, VOCAB, [EOS], max_entries=2)
    specs = [GrammarSpec.regex(f"a{i}") for i in range(3)]
    for s in specs:
        c.compile(s)
    c.compile(specs[2])
    assert c.cache_size() == 2 and c.num_compiled == 3
    c.compile(specs[0])  # evicted: compiled again
    assert c.num_compiled == 4


def test_compiler_needs_eos_ids(tokenizer):
    with pytest.raises(ValueError, match="EOS"):
        GrammarCompiler(tokenizer, VOCAB, [])


# -- matchers and masks ---------------------------------------------------------------------------
@pytest.mark.parametrize("index", range(0, len(SCHEMAS), 5))
def test_random_walks_under_a_schema_always_produce_valid_json(compiler, tokenizer, index):
    prompt, schema = SCHEMAS[index]
    grammar = compiler.compile(GrammarSpec.json_schema(schema))
    for seed in range(3):
        text, finished = walk(compiler, tokenizer, grammar, seed)
        assert finished, (prompt, text)
        jsonschema.validate(json.loads(text), schema)


def test_regex_and_choice_walks_match(compiler, tokenizer):
    import re

    regex = compiler.compile(GrammarSpec.regex(r"[0-9]{3}-[a-z]{2,4}"))
    choice = compiler.compile(GrammarSpec.choice(["yes", "no", "maybe later"]))
    for seed in range(4):
        text, finished = walk(compiler, tokenizer, regex, seed)
        assert finished and re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
        text, finished = walk(compiler, tokenizer, choice, seed)
        assert finished and text in ("yes", "no", "maybe later"), text


def test_json_layout_has_python_separators_and_no_free_whitespace(compiler, tokenizer):
    g = compiler.compile(
        GrammarSpec.json_schema(
            {"properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
        )
    )

    def accepts(text: str) -> bool:
        m = g.new_matcher()
        return all(m.consume(t) for t in tokenizer.encode(text)) and m.is_accepting

    assert accepts('{"a": 1, "b": 2}')
    assert not accepts('{"a":1,"b":2}')
    assert not accepts('{ "a": 1, "b": 2}')
    assert not accepts('{"a": 1, "b": 2, "c": 3}')  # declared properties only


def test_every_eos_id_is_allowed_once_the_grammar_is_complete_and_only_then(compiler, tokenizer):
    g = compiler.compile(GrammarSpec.choice(["yes", "no"]))
    m = g.new_matcher()
    assert EOS not in m.allowed_tokens()
    for t in tokenizer.encode("yes"):
        assert m.consume(t)
    assert m.is_stopped and m.is_accepting
    assert set(m.allowed_tokens()) == {EOS, EXTRA_EOS}
    assert m.num_consumed == len(tokenizer.encode("yes"))


def test_a_disallowed_token_puts_the_matcher_in_error(compiler, tokenizer):
    m = compiler.compile(GrammarSpec.choice(["yes", "no"])).new_matcher()
    assert not m.consume(tokenizer.encode("hello")[0])
    assert m.is_error and "hello" in m.error


def test_matchers_from_one_grammar_are_independent(compiler, tokenizer):
    g = compiler.compile(GrammarSpec.choice(["yes", "no"]))
    a, b = g.new_matcher(), g.new_matcher()
    for t in tokenizer.encode("no"):
        a.consume(t)
    assert a.is_stopped and not b.is_stopped
    assert b.allowed_tokens() == g.new_matcher().allowed_tokens()


def test_a_copied_matcher_continues_independently(compiler, tokenizer):
    g = compiler.compile(GrammarSpec.choice(["yes", "yellow"]))
    a = g.new_matcher()
    for t in tokenizer.encode("ye"):
        assert a.consume(t)
    b = a.copy()
    assert b.num_consumed == a.num_consumed and b.allowed_tokens() == a.allowed_tokens()
    for t in tokenizer.encode("s"):
        assert a.consume(t)
    assert a.is_stopped and not b.is_stopped


def test_batch_bitmask_rows_follow_their_matchers(compiler, tokenizer):
    g = compiler.compile(GrammarSpec.choice(["yes", "no"]))
    matchers = [g.new_matcher() if i % 3 else None for i in range(7)]  # 4+ rows: parallel fill
    for t in tokenizer.encode("yes"):
        matchers[1].consume(t)
    mask = fill_bitmasks(matchers, VOCAB)
    assert mask.shape == (7, (VOCAB + 31) // 32) and mask.dtype == np.int32
    for i, m in enumerate(matchers):
        if m is None:
            assert (mask[i] == -1).all()
        else:
            assert allowed_token_ids(mask[i], VOCAB) == m.allowed_tokens()
    assert set(allowed_token_ids(mask[1], VOCAB)) == {EOS, EXTRA_EOS}
    assert fill_bitmasks([None, None], VOCAB) is None
    assert (allocate_bitmask(2, 33) == -1).all() and allocate_bitmask(2, 33).shape == (2, 2)
