"""Typed engine configuration, validated at construction (torch-free: ``torch_dtype`` imports
torch only when called)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nova.flags import check_minimums, flag, no_flag

LOAD_FORMATS = ("auto", "safetensors", "dummy")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
AUTO_DTYPE = "auto"  # the checkpoint's own dtype (``nova.models.loader.resolve_dtype``)
PARTITION_NAMES = ("auto", "green_context", "none", "cpu")
ATTENTION_NAMES = ("auto", "cpu", "cpu_eager", "sdpa", "triton", "flex")


def torch_dtype(name: str) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``"auto"`` -> None (the loader reads the
    checkpoint's); a ValueError naming the choices otherwise."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; choose {', '.join(DTYPE_NAMES)}")
    if name == AUTO_DTYPE:
        return None
    import torch

    return getattr(torch, name)


AUTO_POLICY = "auto"
# The default on a CPU: chunked prefill, one fused step of at most 2048 tokens. It is what
# vLLM's CPU backend does by default for its server (max_num_batched_tokens 2048 on a CPU,
# vllm/engine/arg_utils.py in vLLM 0.32), and of the policies measured here against vLLM-CPU it
# is the one that matched it served at concurrency 32 (docs/cpu.md, "Against vLLM-CPU").
CPU_DEFAULT_POLICY = "chunked_prefill[budget=2048]"
# On a GPU the stage workers run concurrently on streams, as before.
GPU_DEFAULT_POLICY = "multi_stream"


# An idle engine on a CPU waits this long at most for a burst the server is still preparing, or
# for the successors of answers it just sent (nova.engine.arrivals): on the 2-core AMD EPYC a
# wave of 32 chat requests from vllm bench serve reached the engine over 27-57 ms in one run
# and 30-162 ms, with gaps of up to 89 ms between two requests, in a slower phase of the
# machine (benchmarks/results/serve_waves_amd.md, serve_waves_amd_b.md; docs/cpu.md, "A wave
# of requests"), where a 50 ms bound split 4 of 12 waves and a split wave's late requests wait
# a whole extra prefill step (about 1.3 s there). The bound keeps a request whose announced
# companions or expected successors never come from waiting longer.
CPU_ARRIVAL_WAIT_MS = 150.0


def is_cpu_device(device: str) -> bool:
    """Whether ``device`` (a torch device string: cpu, cuda, cuda:1) is the CPU."""
    return device.split(":")[0] == "cpu"


def resolve_policy(policy: str, device: str) -> str:
    """``policy``, or for ``auto`` the default for ``device`` (a torch device string)."""
    if policy != AUTO_POLICY:
        return policy
    return CPU_DEFAULT_POLICY if is_cpu_device(device) else GPU_DEFAULT_POLICY


@dataclass(slots=True, frozen=True)
class EngineConfig:
    """What the engine is built from. Each field's metadata declares its command-line flag
    (``nova.flags``): ``nova serve``, ``nova generate``, ``nova demo`` and ``nova profile`` take
    their engine flags from here."""

    model: str = field(
        default="demo",
        metadata=flag("a Hugging Face model directory, a shipped config name, or 'demo'"),
    )
    load_format: str = field(
        default="auto",
        metadata=flag(
            "weights: the directory's safetensors (auto, safetensors) or random (dummy, seeded)",
            choices=LOAD_FORMATS,
        ),
    )
    dtype: str = field(
        default=AUTO_DTYPE,
        metadata=flag(
            "weight dtype; auto: the checkpoint's (its config's torch_dtype; float16 runs as "
            "bfloat16 on a CPU, and a CPU without bfloat16 support runs float32; float32 when "
            "the config names none)",
            choices=DTYPE_NAMES,
        ),
    )
    device: str = field(default="cpu", metadata=flag("torch device, e.g. cpu, cuda, cuda:1"))
    policy: str = field(
        default="auto",
        metadata=flag(
            "scheduling policy (see 'nova models'); auto: chunked_prefill[budget=2048] on a "
            "CPU, multi_stream on a GPU"
        ),
    )
    arrival_wait_ms: float | None = field(
        default=None,
        metadata=flag(
            "an idle engine waits up to this long for requests the server has accepted and is "
            "still preparing, so that a burst starts in one batch (default: "
            f"{CPU_ARRIVAL_WAIT_MS:g} on a CPU, where the server prepares requests on the "
            "engine's cores; 0 on a GPU; 0: off)",
            minimum=0,
        ),
    )
    successor_hold: bool = field(
        default=True,
        metadata=flag(
            "within --arrival-wait-ms, an idle engine does not wait for the next requests of "
            "clients whose answers it just sent (on by default: clients that step in lock-step "
            "then start each round in one batch)"
        ),
    )
    block_size: int = field(default=16, metadata=flag("tokens per KV-cache block", minimum=1))
    num_kv_blocks: int | None = field(
        default=None,
        metadata=flag(
            "KV-cache blocks (default: sized from --kv-cache-bytes or memory)", minimum=1
        ),
    )
    kv_cache_bytes: int | None = field(
        default=None,
        metadata=flag(
            "KV-cache size in bytes when --num-kv-blocks is not given (default: 1 GiB on a "
            "CPU, a share of the GPU's free memory on CUDA)",
            minimum=1,
        ),
    )
    max_num_seqs: int = field(
        default=64,
        metadata=flag("decode batch cap (and prefill requests per batch)", minimum=1),
    )
    max_prefill_tokens: int = field(
        default=4096, metadata=flag("prefill batch token budget", minimum=1)
    )
    max_vision_images: int = field(default=8, metadata=flag("images per vision batch", minimum=1))
    max_image_pixels: int | None = field(
        default=4096 * 4096,
        metadata=no_flag(
            "the server's --max-image-pixels (ServerConfig) sets it; offline commands keep the "
            "default"
        ),
    )
    seed: int = field(default=0, metadata=flag("seed of dummy weights"))
    # GPU mechanisms (nova.gpu; docs/gpu.md). All fall back cleanly on a CPU.
    partition: str = field(
        default="auto",
        metadata=flag(
            "SM partition backend: green contexts on a GPU that has them, else none",
            choices=PARTITION_NAMES,
        ),
    )
    cuda_graphs: bool = field(
        default=True,
        metadata=flag("run decode eagerly on CUDA (graphs are never used on a CPU)"),
    )
    warmup: bool = field(
        default=True,
        metadata=flag(
            "skip the start-up warm-up forward (vision, prefill, decode on scratch KV blocks); "
            "the first requests then pay the one-time costs (a CPU's weight packing)"
        ),
    )
    attention_backend: str = field(
        default="auto", metadata=flag("paged attention kernel", choices=ATTENTION_NAMES)
    )
    vision_offload_layers: int = field(
        default=0,
        metadata=flag(
            "keep vision-encoder weights in host memory, K layers on the device (0: resident)",
            minimum=0,
            metavar="K",
        ),
    )
    cpu_adapt_threads: bool = field(
        default=True,
        metadata=flag(
            "on a CPU, keep one intra-op thread per core of this process however busy the "
            "cores are (by default batches run on fewer cores while other processes use them)"
        ),
    )
    cpu_min_split_cores: int = field(
        default=2,  # nova.gpu.cpu_cores.MIN_SPLIT_CORES (its source is there)
        metadata=flag(
            "on a CPU, the fewest cores a stage is split down to when stages run at once; "
            "below that they take turns on every core, decode first (1: always split)",
            minimum=1,
            metavar="N",
        ),
    )
    # Caches across requests (agent sessions resend the same prompt prefix and screenshots).
    prefix_caching: bool = field(
        default=True,
        metadata=flag(
            "do not reuse the KV blocks of prompt prefixes (and images) earlier requests computed"
        ),
    )
    encoder_cache_bytes: int = field(
        default=1 << 30,
        metadata=flag(
            "device memory for image embeddings kept by image hash, so a resent image skips "
            "decoding, preprocessing and the vision encoder (0: off)",
            minimum=0,
        ),
    )
    # Dynamic-resolution vision (Qwen2-VL family): None keeps the processor's value.
    min_pixels: int | None = field(
        default=None,
        metadata=flag("Qwen2-VL family: override the processor's min_pixels", minimum=1),
    )
    max_pixels: int | None = field(
        default=None,
        metadata=flag("Qwen2-VL family: override the processor's max_pixels", minimum=1),
    )

    # Sampling defaults for fields a request leaves unset (nova.models.loader
    # .read_generation_defaults): the model's generation_config.json, vLLM's switch.
    generation_config: str = field(
        default="auto",
        metadata=flag(
            "sampling defaults for unset request fields: 'auto' = the model's "
            "generation_config.json, 'vllm' = ignore it, or a directory holding one",
            metavar="auto|vllm|DIR",
        ),
    )

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose {', '.join(DTYPE_NAMES)}")
        check_minimums(self)  # the flags' minimums: block_size >= 1, ...
        if self.partition not in PARTITION_NAMES:
            raise ValueError(
                f"unknown partition backend {self.partition!r}; choose {', '.join(PARTITION_NAMES)}"
            )
        if self.attention_backend not in ATTENTION_NAMES:
            raise ValueError(
                f"unknown attention backend {self.attention_backend!r}; "
                f"choose {', '.join(ATTENTION_NAMES)}"
            )
        if (
            self.min_pixels is not None
            and self.max_pixels is not None
            and self.min_pixels > self.max_pixels
        ):
            raise ValueError(f"min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")
        from nova.core.policy import check_policy_name

        try:  # a registered name, with variant parameters if any: chunked_prefill[budget=2048]
            check_policy_name(self.resolved_policy)
        except (KeyError, ValueError) as exc:
            reason = exc.args[0] if exc.args else str(exc)
            raise ValueError(
                f"{reason} (a policy may carry variant parameters: chunked_prefill[budget=2048])"
            ) from exc

    @property
    def resolved_arrival_wait_s(self) -> float:
        """``arrival_wait_ms`` in seconds, the default for ``device`` when unset."""
        if self.arrival_wait_ms is not None:
            return self.arrival_wait_ms / 1000.0
        return CPU_ARRIVAL_WAIT_MS / 1000.0 if is_cpu_device(self.device) else 0.0

    @property
    def resolved_policy(self) -> str:
        """The policy the engine runs: ``policy``, with ``auto`` resolved for ``device``."""
        return resolve_policy(self.policy, self.device)

    @property
    def torch_dtype(self) -> Any:
        return torch_dtype(self.dtype)
