"""GPU mechanisms: SM-partition backends (``partition``), vision-encoder weight streaming
(``offload``) and start-up memory accounting (``memory``). Every piece has a CPU path that runs
the same logic, so it is tested without a GPU (see docs/gpu.md)."""
