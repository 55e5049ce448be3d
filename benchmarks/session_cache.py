"""An agent session with the caches on vs off: per-step TTFT and E2E.

One UI-TARS-style session (``agent_sessions``: 10 steps, a window of the last 5 screenshots,
real 1080x1920 PNG screenshots that change a little per step; every step resends the system
prompt, the history and the window) is sent through Nova's OpenAI-compatible server by the
streaming bench client (client-side times), on the demo model on this CPU, with

- ``on``: prefix caching and a 1 GiB encoder cache (the defaults);
- ``off``: ``--no-prefix-caching --encoder-cache-bytes 0``.

Each run starts a fresh engine (cold caches); runs alternate on/off (``--repeats`` pairs, the
order flipped every pair) so load changes on a shared machine hit both alike; per step the
median over repeats is reported. EOS is ignored, so both modes generate the same tokens.

Where step TTFT goes: every step's engine-side phases (vision queue and encoder, prefill queue
and prefill, from the engine's own request times) are recorded; what is left of the client's
TTFT is the front end (HTTP, base64, hashing, image decoding and preprocessing, tokenisation,
streaming the first chunk). Then the last step's compute on one core (thread CPU time, so other
jobs on the machine do not count): the vision encoder for the images each mode encodes, and the
prefill forward of the tokens each mode computes; their ratio is the floor the caches can reach
for that step on this machine whatever the scheduling.

Then the same session in the simulator for Qwen2.5-VL-7B on an H100 SXM (roofline cost model;
1920x1080 screenshots, i.e. 2691 image tokens each), caches modelled with the engine's code.

Results: benchmarks/results/session_cache_cpu.{json,md} (machine, load, per-step figures).
Usage: .venv/bin/python benchmarks/session_cache.py [--repeats 3] [--steps 10] [--window 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any, TypeVar

from runtime_throughput import machine

from nova.bench.driver import BenchConfig, run_workload
from nova.config import EngineConfig
from nova.engine.async_engine import AsyncEngine, OutputDelta
from nova.metrics import RequestMetrics
from nova.server.app import create_app
from nova.server.config import ServerConfig
from nova.server.testing import ServerThread
from nova.workload import Workload, make_workload

MODES = {
    "on": {"prefix_caching": True, "encoder_cache_bytes": 1 << 30},
    "off": {"prefix_caching": False, "encoder_cache_bytes": 0},
}


T = TypeVar("T")


class RecordingEngine(AsyncEngine):
    """The engine, keeping each finished request's engine-side metrics (arrival order)."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.finished: list[RequestMetrics] = []

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncGenerator[OutputDelta, None]:
        async for delta in super().generate(*args, **kwargs):
            if delta.finished and delta.metrics is not None:
                self.finished.append(delta.metrics)
            yield delta


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def session(args: argparse.Namespace) -> Workload:
    return make_workload(
        "agent_sessions",
        num_sessions=1,
        steps_per_session=args.steps,
        window=args.window,
        think_time_s=args.think_time_s,
        image_width=args.width,
        image_height=args.height,
        min_tokens=args.max_tokens,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )


def run_cpu(mode: str, wl: Workload, args: argparse.Namespace) -> dict[str, Any]:
    cfg = EngineConfig(model=args.model, num_kv_blocks=args.kv_blocks, **MODES[mode])
    engine = RecordingEngine(cfg)
    try:
        app = create_app(engine, ServerConfig(served_model_name="demo"))
        with ServerThread(app) as srv:
            bench = BenchConfig(base_url=srv.base_url, ignore_eos=True, disable_tqdm=True)
            load_before = load_avg()
            t0 = time.perf_counter()
            run = asyncio.run(run_workload(wl, bench))
            wall = time.perf_counter() - t0
            snap = engine.snapshot()
    finally:
        engine.shutdown()
    recs = sorted(run.records, key=lambda r: r.request_id)
    # one closed-loop session: the engine saw the steps in order
    engine_side = sorted(engine.finished, key=lambda m: m.arrival_s)
    if len(engine_side) != len(recs):
        raise RuntimeError(f"{mode}: {len(recs)} steps, {len(engine_side)} engine records")
    steps = []
    for r, em in zip(recs, engine_side):
        m = r.metrics(run.t0_s)
        if not r.ok:
            raise RuntimeError(f"{mode}: {r.request_id} failed: {r.error}")
        steps.append(
            {
                "request_id": r.request_id,
                "ttft_s": m.ttft_s,
                "e2e_s": m.e2e_s,
                "prompt_tokens": r.prompt_tokens,
                "cached_tokens": r.cached_tokens,
                "completion_tokens": r.completion_tokens,
                **engine_phases(em),
            }
        )
    return {
        "mode": mode,
        "wall_s": round(wall, 2),
        "load_before": load_before,
        "load_after": load_avg(),
        "steps": steps,
        "prefix_cache_hit_tokens": snap.prefix_cache_hit_tokens,
        "prefix_cache_queried_tokens": snap.prefix_cache_queried_tokens,
        "encoder_cache_hit_images": snap.encoder_cache_hit_images,
        "encoder_cache_queried_images": snap.encoder_cache_queried_images,
    }


def engine_phases(m: RequestMetrics) -> dict[str, float]:
    """A step's engine-side TTFT and its phases (s; 0 for a phase that did not run: the
    vision stage is skipped when every image hit the encoder cache)."""
    return {
        "engine_ttft_s": m.ttft_s or 0.0,
        "vision_queue_s": m.vision_queue_s or 0.0,
        "vision_s": m.vision_s or 0.0,
        "prefill_queue_s": m.prefill_queue_s or 0.0,
        "prefill_s": m.prefill_s or 0.0,
    }


def on_worker_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a fresh thread, as the engine's stage workers run (glibc gives each thread
    its own malloc arena: a worker's large temporaries are served differently from the main
    thread's)."""
    out: list[T] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    if not out:
        raise RuntimeError("the measurement thread failed")
    return out[0]


def compute_floor(
    args: argparse.Namespace, prompt_tokens: int, cached_tokens: int, repeats: int = 3
) -> dict[str, Any]:
    """The last step's compute in each mode on one core (thread CPU s, median of ``repeats``):
    ``off`` encodes the window's images and prefills the whole prompt; ``on`` encodes the one
    new screenshot and prefills the uncached tokens on top of the cached ones."""
    import torch

    from nova.models.loader import load_model
    from nova.runtime.forward_batch import SeqInput
    from nova.runtime.runner import CacheConfig, ModelRunner

    def measure() -> dict[str, Any]:
        torch.set_num_threads(1)
        loaded = load_model(args.model, "auto", torch.float32, "cpu", 0, "auto")
        runner = ModelRunner(loaded, CacheConfig(num_blocks=args.kv_blocks))
        vision = loaded.model.vision
        if vision is None or loaded.model.dynamic_resolution:
            raise ValueError("the compute floor is measured for fixed-size (LLaVA) image models")
        side = int(vision.vision_tower.config.image_size)
        blocks = list(range(-(-prompt_tokens // runner.block_size)))

        def cpu_s(fn: Callable[[], Any]) -> float:
            times = []
            for _ in range(repeats):
                t0 = time.thread_time()
                fn()
                times.append(time.thread_time() - t0)
            return statistics.median(times)

        with torch.inference_mode():
            pix = {n: torch.randn(n, 3, side, side) for n in (1, args.window)}
            res = {
                "vision_on_s": cpu_s(lambda: runner.encode_images(pix[1])),
                "vision_off_s": cpu_s(lambda: runner.encode_images(pix[args.window])),
                "prefill_off_s": cpu_s(
                    lambda: runner.forward([SeqInput([1] * prompt_tokens, 0, blocks)])
                ),
                "prefill_on_s": cpu_s(
                    lambda: runner.forward(
                        [SeqInput([1] * (prompt_tokens - cached_tokens), cached_tokens, blocks)]
                    )
                ),
                "prefill_uncached_alone_s": cpu_s(
                    lambda: runner.forward(
                        [SeqInput([1] * (prompt_tokens - cached_tokens), 0, blocks)]
                    )
                ),
            }
        res["images_on"], res["images_off"] = 1, args.window
        res["prompt_tokens"], res["cached_tokens"] = prompt_tokens, cached_tokens
        res["ratio"] = (res["vision_on_s"] + res["prefill_on_s"]) / (
            res["vision_off_s"] + res["prefill_off_s"]
        )
        return res

    threads = torch.get_num_threads()
    try:
        return on_worker_thread(measure)
    finally:
        torch.set_num_threads(threads)


def per_step_medians(runs: list[dict[str, Any]], key: str) -> list[float]:
    n = len(runs[0]["steps"])
    return [statistics.median(r["steps"][i][key] for r in runs) for i in range(n)]


PHASES = ("vision_queue_s", "vision_s", "prefill_queue_s", "prefill_s")


def last_step_phases(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The last step's TTFT split (medians over runs, s): the front end (client TTFT minus the
    engine's), the engine's phases, and the rest of the engine's TTFT (first token's delivery)."""
    last = [r["steps"][-1] for r in runs]
    out = {"ttft_s": statistics.median(s["ttft_s"] for s in last)}
    out["front_s"] = statistics.median(s["ttft_s"] - s["engine_ttft_s"] for s in last)
    for k in PHASES:
        out[k] = statistics.median(s[k] for s in last)
    out["engine_other_s"] = statistics.median(
        s["engine_ttft_s"] - sum(s[k] for k in PHASES) for s in last
    )
    return out


def run_sim(args: argparse.Namespace, window: int) -> dict[str, Any]:
    """The same session (1920x1080 screenshots, the last ``window`` kept) for Qwen2.5-VL-7B on
    an H100, caches on/off."""
    from nova.core.policy import make_policy
    from nova.cost.base import make_cost_model
    from nova.cost.model_spec import get_model_spec
    from nova.metrics import request_metrics
    from nova.sim.eval import num_kv_blocks
    from nova.sim.simulator import Simulator, arrivals_from_workload

    w, h = 1920, 1080
    base = get_model_spec("qwen2.5-vl-7b")
    spec = base.with_pixel_limits(image_size=(w, h))
    cost = make_cost_model("roofline", "h100-sxm", spec)
    wl = make_workload(
        "agent_sessions",
        num_sessions=1,
        steps_per_session=args.steps,
        window=window,
        think_time_s=args.think_time_s,
        image_width=w,
        image_height=h,
        min_tokens=args.max_tokens,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    image_tokens = spec.image_tokens_for(w, h)
    out: dict[str, Any] = {
        "model": "qwen2.5-vl-7b",
        "gpu": "h100-sxm",
        "cost_model": cost.name,
        "image_tokens": image_tokens,
        "window": window,
    }
    encoder_bytes = 4 << 30
    for mode, on in (("on", True), ("off", False)):
        sim = Simulator(
            make_policy("multi_stream"),
            cost,
            num_kv_blocks(cost, spec, 16)
            - (encoder_bytes if on else 0) // int(spec.kv_bytes_per_token * 16),
            16,
            image_tokens,
            prefix_caching=on,
            encoder_cache_bytes=encoder_bytes if on else 0,
            embed_bytes_per_token=int(spec.text_hidden * spec.bytes_per_param),
        )
        res = sim.run(arrivals_from_workload(wl))
        ms = [request_metrics(r) for r in sorted(res.requests, key=lambda r: r.request_id)]
        out[mode] = {
            "ttft_s": [m.ttft_s for m in ms],
            "e2e_s": [m.e2e_s for m in ms],
            "prompt_tokens": [len(r.prompt_token_ids) for r in res.requests],
            "cached_tokens": [r.num_cached_prompt_tokens for r in res.requests],
            "prefix_cache_hit_tokens": res.prefix_cache_hit_tokens,
            "encoder_cache_hit_images": res.encoder_cache_hit_images,
        }
    return out


def sim_table(sim: dict[str, Any]) -> list[str]:
    lines = [
        "| step | prompt tokens | cached tokens (on) | TTFT on s | TTFT off s | on/off | "
        "E2E on s | E2E off s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i in range(len(sim["on"]["ttft_s"])):
        t_on, t_off = sim["on"]["ttft_s"][i], sim["off"]["ttft_s"][i]
        lines.append(
            f"| {i + 1} | {sim['on']['prompt_tokens'][i]} | {sim['on']['cached_tokens'][i]} | "
            f"{t_on:.3f} | {t_off:.3f} | {t_on / t_off:.2f} | {sim['on']['e2e_s'][i]:.3f} | "
            f"{sim['off']['e2e_s'][i]:.3f} |"
        )
    return lines


def phase_lines(cpu: dict[str, Any], last: int) -> list[str]:
    phases = cpu.get("last_step_phases")
    if not phases:
        return []
    cols = [
        ("TTFT", "ttft_s"),
        ("front end", "front_s"),
        ("vision queue", "vision_queue_s"),
        ("vision", "vision_s"),
        ("prefill queue", "prefill_queue_s"),
        ("prefill", "prefill_s"),
        ("engine, rest", "engine_other_s"),
    ]
    lines = [
        "",
        f"### Where step {last}'s TTFT goes (s, median of the runs)",
        "",
        "`front end`: the client's TTFT minus the engine's (HTTP, base64, hashing, decoding and "
        "preprocessing the images the encoder cache does not have, the chat template and "
        "tokens, the first streamed chunk). The engine's phases come from its request times; "
        "`prefill` is one forward here (the prompt fits one prefill batch). `engine, rest`: "
        "the engine's TTFT minus its phases (handing the first token to the server).",
        "",
        "| caches | " + " | ".join(name for name, _ in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for mode in ("on", "off"):
        ph = phases[mode]
        lines.append(f"| {mode} | " + " | ".join(f"{ph[k]:.3f}" for _, k in cols) + " |")
    return lines


def floor_lines(floor: dict[str, Any] | None, ratio: float, last: int) -> list[str]:
    if not floor:
        return []
    on = floor["vision_on_s"] + floor["prefill_on_s"]
    off = floor["vision_off_s"] + floor["prefill_off_s"]
    uncached = floor["prompt_tokens"] - floor["cached_tokens"]
    return [
        "",
        f"### The floor: step {last}'s compute on one core (thread CPU s, median of 3)",
        "",
        "What each mode must compute for the step, measured alone on one core (a worker "
        "thread, as the engine's stages run; other jobs on the machine do not count in thread "
        "CPU time):",
        "",
        "| caches | vision encoder | prefill forward | total |",
        "|---|---:|---:|---:|",
        f"| on | {floor['vision_on_s']:.3f} ({floor['images_on']} image) | "
        f"{floor['prefill_on_s']:.3f} ({uncached} tokens on {floor['cached_tokens']} cached) "
        f"| {on:.3f} |",
        f"| off | {floor['vision_off_s']:.3f} ({floor['images_off']} images) | "
        f"{floor['prefill_off_s']:.3f} ({floor['prompt_tokens']} tokens) | {off:.3f} |",
        "",
        f"Compute ratio on/off: **{floor['ratio']:.2f}** (measured TTFT ratio {ratio:.2f}). "
        f"The {uncached} uncached tokens alone, with no cached prefix to attend to, cost "
        f"{floor['prefill_uncached_alone_s']:.3f} s: the linear layers scale with the "
        f"recomputed share ({uncached / floor['prompt_tokens']:.0%} of the prompt), attention "
        "with it times the context. The front end's share (decoding and preprocessing the "
        "window's images without the encoder cache) is in the table above. Whatever the "
        "scheduling, a step whose prompt changed before its kept screenshots cannot cost less "
        "than this compute with exact (recomputed) KV.",
    ]


def render(report: dict[str, Any]) -> str:
    cpu, sim, args = report["cpu"], report["sim"], report["args"]
    lines = [
        "# Agent session with the caches on vs off",
        "",
        f"Machine: {report['machine']}. Load average (1/5/15 min) at the start: "
        f"{report['load_start']}, at the end: {report['load_end']}. OpenMP environment: "
        f"{report.get('env', {})}.",
        "",
        f"One `agent_sessions` session: {args['steps']} steps, a window of the last "
        f"{args['window']} screenshots ({args['width']}x{args['height']} PNG), "
        f"{args['max_tokens']} output tokens per step (EOS ignored), through the HTTP server and "
        f"the streaming bench client. Median of {args['repeats']} interleaved runs per mode "
        "(fresh engine each). `uncached`: the share of the prompt the step prefills with the "
        "caches on.",
        "",
        "## Demo model on this CPU",
        "",
        "| step | prompt tokens | cached tokens (on) | uncached | TTFT on s | TTFT off s | "
        "on/off | E2E on s | E2E off s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (t_on, t_off, e_on, e_off) in enumerate(
        zip(cpu["ttft_on_s"], cpu["ttft_off_s"], cpu["e2e_on_s"], cpu["e2e_off_s"])
    ):
        prompt, cached = cpu["prompt_tokens"][i], cpu["cached_tokens_on"][i]
        lines.append(
            f"| {i + 1} | {prompt} | {cached} | {1 - cached / prompt:.2f} | "
            f"{t_on:.2f} | {t_off:.2f} | {t_on / t_off:.2f} | {e_on:.2f} | {e_off:.2f} |"
        )
    last = len(cpu["ttft_on_s"])
    ratio = cpu["last_step_ttft_ratio"]
    prompt, cached = cpu["prompt_tokens"][-1], cpu["cached_tokens_on"][-1]
    lines += [
        "",
        f"Step {last} TTFT with caches / without: **{ratio:.2f}** "
        f"(target <= 0.5: {'met' if ratio <= 0.5 else 'not met'}). With the caches on, step "
        f"{last} still prefills {prompt - cached} of its {prompt} prompt tokens "
        f"({1 - cached / prompt:.0%}): the tokens after the dropped screenshot, the kept "
        "screenshots' among them. The encoder cache removes the kept screenshots' decoding, "
        "preprocessing and vision encoder, so the ratio can sit below that share, but the "
        "prefill of those tokens stays.",
        *phase_lines(cpu, last),
        *floor_lines(report.get("floor"), ratio, last),
        "",
        "## Simulator: Qwen2.5-VL-7B on an H100 SXM (roofline)",
        "",
        f"1920x1080 screenshots = {sim['image_tokens']} image tokens each; cost model "
        f"`{sim['cost_model']}`; window {sim.get('window', args['window'])}.",
        "",
        *sim_table(sim),
    ]
    full = report.get("sim_no_window")
    if full is not None:
        lines += [
            "",
            f"The same session keeping every screenshot (window {full['window']}: no "
            "screenshot ever leaves, so each step's prompt extends the previous one):",
            "",
            *sim_table(full),
        ]
    lines += [
        "",
        "Why the window caps the gain: once the oldest screenshot leaves the window (step "
        f"{int(args['window']) + 1} on), a step's prompt diverges from the previous one where "
        "that screenshot was, so the KV of every later token (the kept screenshots included: "
        "their K/V depend on all tokens before them) is recomputed; the encoder cache still "
        "saves decoding, preprocessing and the vision encoder for the screenshots seen before.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--width", type=int, default=1080)
    ap.add_argument("--height", type=int, default=1920)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--think-time-s", type=float, default=0.2)
    ap.add_argument("--kv-blocks", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--skip-cpu",
        action="store_true",
        help="simulator part only: it replaces the simulator figures of the results file, whose "
        "CPU figures (measured earlier) are kept",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    report: dict[str, Any] = {
        "machine": machine(),
        "load_start": load_avg(),
        # libgomp reads these once at start-up (docs/cpu.md: waiting under contention)
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    sim = run_sim(args, args.window)
    report["sim"] = sim
    report["sim_no_window"] = run_sim(args, args.steps)
    for i, (a, b) in enumerate(zip(sim["on"]["ttft_s"], sim["off"]["ttft_s"])):
        print(f"sim step {i + 1}: TTFT on {a:.3f}s off {b:.3f}s ({a / b:.2f})")
    path = args.out / "session_cache_cpu.json"
    if args.skip_cpu and path.exists():
        kept = json.loads(path.read_text())
        kept["sim"], kept["sim_no_window"] = report["sim"], report["sim_no_window"]
        path.write_text(json.dumps(kept, indent=2) + "\n")
        (args.out / "session_cache_cpu.md").write_text(render(kept))
        print(render(kept))
    if not args.skip_cpu:
        wl = session(args)
        runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
        for rep in range(args.repeats):
            for mode in ("on", "off") if rep % 2 == 0 else ("off", "on"):
                r = run_cpu(mode, wl, args)
                runs[mode].append(r)
                ttft = " ".join(f"{s['ttft_s']:.2f}" for s in r["steps"])
                print(f"run {rep} {mode}: wall {r['wall_s']}s load {r['load_after']} TTFT {ttft}")
        on, off = runs["on"], runs["off"]
        cpu = {
            "runs": runs,
            "ttft_on_s": per_step_medians(on, "ttft_s"),
            "ttft_off_s": per_step_medians(off, "ttft_s"),
            "e2e_on_s": per_step_medians(on, "e2e_s"),
            "e2e_off_s": per_step_medians(off, "e2e_s"),
            "prompt_tokens": [s["prompt_tokens"] for s in on[0]["steps"]],
            "cached_tokens_on": [s["cached_tokens"] for s in on[0]["steps"]],
        }
        cpu["last_step_ttft_ratio"] = cpu["ttft_on_s"][-1] / cpu["ttft_off_s"][-1]
        cpu["last_step_phases"] = {mode: last_step_phases(runs[mode]) for mode in runs}
        report["cpu"] = cpu
        report["floor"] = compute_floor(args, cpu["prompt_tokens"][-1], cpu["cached_tokens_on"][-1])
        print(f"compute floor of step {args.steps}: {report['floor']}")
        report["load_end"] = load_avg()
        print(f"step {args.steps} TTFT on/off: {cpu['last_step_ttft_ratio']:.2f}")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "session_cache_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "session_cache_cpu.md").write_text(render(report))
        print(render(report))


if __name__ == "__main__":
    main()
