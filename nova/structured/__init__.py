"""Structured output: constrain generation to a JSON schema, a regex, a choice or a grammar.

- ``spec``: ``GrammarSpec``, what a request is constrained to (plain data, the cache key);
- ``compiler``: ``GrammarCompiler`` (one per model's tokenizer; compiles and caches specs with
  llguidance, raising ``GrammarError`` that names the problem) and ``CompiledGrammar``;
- ``matcher``: ``GrammarMatcher`` (one request's grammar state, in the executor's payload) and
  the batch bitmask (``fill_bitmasks``);
- ``apply``: applying a batch's bitmask to its logits (torch; the only module here that
  imports it, so the server can compile without torch).

The grammar engine is llguidance: it compiles exactly the schema or reports why it cannot
(unsupported keywords are errors, not silently dropped), and needs no torch or triton.
"""

from __future__ import annotations

from nova.structured.spec import GrammarError, GrammarSpec

__all__ = ["GrammarError", "GrammarSpec"]
