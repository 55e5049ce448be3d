"""Tool calling: tools into the prompt, tool calls out of the model's text.

- ``render``: the tools and tool-call history for a chat template (and Nova's own Hermes-style
  rendering for templates without tool support); which call format a model uses;
- ``grammar``: grammars forcing calls (``tool_choice`` ``required`` or a named function) in
  the model's format, through ``nova.structured``;
- ``parsers``: incremental parsers turning output text into content and OpenAI ``tool_calls``
  deltas (``hermes``, ``llama3_json``), and the merge into complete calls;
- ``scan``: the incremental scanner of one call's JSON object.

Torch-free and server-free.
"""
