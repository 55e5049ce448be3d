"""GPU mechanisms: SM partitions (planning in ``sm_plan``, backends in ``backend`` and
``green_context``, PyTorch's green-context API in ``green_api``, the driver probe in
``driver_probe``, selection in ``partition``), vision-encoder weight streaming (``offload``) and
start-up memory accounting (``memory``). Every piece has a CPU path that runs the same logic, so
it is tested without a GPU (see docs/gpu.md)."""
