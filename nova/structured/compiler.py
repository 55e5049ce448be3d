"""Compile ``GrammarSpec``s into grammars the engine can match, once per spec (cached).

One ``GrammarCompiler`` per served model wraps the model's tokenizer for llguidance (built on
first use: about 1 s for a 49k vocabulary). ``compile(spec)`` turns a spec into a
``CompiledGrammar`` or raises ``GrammarError`` with llguidance's own message (an unsupported
JSON-schema keyword, a bad regex, an unknown rule): llguidance either compiles a grammar that
matches exactly the schema or says why not, so nothing is silently loosened. Compiling builds a
prototype matcher and computes its first mask (the lexer's start states, milliseconds for a
schema), so requests only copy it (microseconds). Compilation releases the GIL; the server runs
it on its preparation pool, never on the event loop or an engine worker.

Torch-free (llguidance and its numpy helpers only), so the HTTP server can compile.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import llguidance
import llguidance.numpy as llg_numpy

from nova.structured.matcher import GrammarMatcher
from nova.structured.spec import JSON_OPTIONS, GrammarError, GrammarSpec

DEFAULT_CACHE_ENTRIES = 256


class CompiledGrammar:
    """A checked grammar for one tokenizer: ``new_matcher()`` gives a request its own state."""

    __slots__ = ("_prototype", "spec", "vocab_size")

    def __init__(self, spec: GrammarSpec, prototype: llguidance.LLMatcher, vocab_size: int):
        self.spec = spec
        self.vocab_size = vocab_size  # logits width the masks are made for
        self._prototype = prototype  # never advanced: only copied

    def new_matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._prototype.deep_copy(), self.vocab_size)

    def __repr__(self) -> str:
        return f"CompiledGrammar({self.spec.kind}, {len(self.spec.source)} chars)"


def grammar_text(spec: GrammarSpec) -> str:
    """llguidance's grammar for ``spec`` (not yet checked against a tokenizer)."""
    try:
        if spec.kind == "json_schema":
            options: Any = JSON_OPTIONS  # llguidance's JsonCompileOptions (a TypedDict)
            return str(llguidance.LLMatcher.grammar_from_json_schema(spec.source, options))
        if spec.kind == "regex":
            return str(llguidance.LLMatcher.grammar_from_regex(spec.source))
        if spec.kind == "choice":
            return str(llguidance.grammar_from("choice", spec.source))
        return str(llguidance.grammar_from("grammar", spec.source))  # Lark or GBNF
    except ValueError as exc:
        raise GrammarError(f"invalid {spec.kind} grammar: {exc}") from exc


class GrammarCompiler:
    """Compiles specs for one tokenizer; thread-safe; keeps the last ``max_entries`` compiled
    grammars (and the specs that failed, with their errors).

    ``tokenizer``: a fast Hugging Face tokenizer; ``vocab_size``: the width of the model's
    logits (may exceed the tokenizer's vocabulary); ``eos_token_ids``: every id that ends
    generation (a finished grammar allows exactly these)."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        max_entries: int = DEFAULT_CACHE_ENTRIES,
    ) -> None:
        if not eos_token_ids:
            raise ValueError("structured output needs the model's EOS token ids")
        self.hf_tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.max_entries = max_entries
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar | GrammarError] = OrderedDict()
        self.num_compiled = 0  # cache misses, for tests and metrics

    @property
    def ll_tokenizer(self) -> Any:
        """llguidance's view of the tokenizer, built on first use."""
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                try:
                    self._ll_tokenizer = llguidance.hf.from_tokenizer(
                        self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_ids
                    )
                except ValueError as exc:  # a slow (Python) tokenizer
                    raise GrammarError(f"structured output needs a fast tokenizer: {exc}") from exc
            return self._ll_tokenizer

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar of ``spec`` (from the cache when seen before); raises
        ``GrammarError`` naming the problem."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
        if hit is None:
            hit = self._compile(spec)
            with self._lock:
                self._cache[spec] = hit
                self._cache.move_to_end(spec)
                while len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
        if isinstance(hit, GrammarError):
            raise GrammarError(str(hit))
        return hit

    def _compile(self, spec: GrammarSpec) -> CompiledGrammar | GrammarError:
        with self._lock:
            self.num_compiled += 1
        try:
            text = grammar_text(spec)
        except GrammarError as exc:
            return exc
        tok = self.ll_tokenizer
        error = llguidance.LLMatcher.validate_grammar(text, tok)
        if error:
            return GrammarError(f"{_what(spec)}: {error.strip()}")
        prototype = llguidance.LLMatcher(tok, text, log_level=0)
        if prototype.is_error():
            return GrammarError(f"{_what(spec)}: {prototype.get_error().strip()}")
        # The first mask builds the lexer's start states, shared by every copy.
        llg_numpy.fill_next_token_bitmask(
            prototype, llg_numpy.allocate_token_bitmask(1, self.vocab_size), 0
        )
        return CompiledGrammar(spec, prototype, self.vocab_size)

    def cache_size(self) -> int:
        with self._lock:
            return len(self._cache)


def _what(spec: GrammarSpec) -> str:
    return {
        "json_schema": "the JSON schema is not supported",
        "regex": "the regular expression is not supported",
        "choice": "the choice list is not supported",
        "grammar": "the grammar is not valid",
    }.get(spec.kind, "the grammar is not valid")
