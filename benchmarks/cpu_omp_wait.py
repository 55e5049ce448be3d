"""One engine run on the CPU: wall time, process CPU time and batches, for comparing OpenMP
wait policies (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``: set them in the environment, libgomp
reads them when it loads) and scheduling policies under the same load.

64 chat prompts x ``--max-tokens`` forced tokens through ``nova.LLM`` (after an untimed
8-prompt warm-up) on the peer text model (``peer_model.py``). Prints one line; writes nothing.
Process CPU time far above wall x cores' share means threads spin while waiting.
Usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/cpu_omp_wait.py --policy multi_stream
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from peer_model import export_text_model

from nova.llm import LLM
from nova.sampling_params import SamplingParams


def timed_generate(llm: LLM, max_tokens: int, num_prompts: int) -> dict[str, Any]:
    """``num_prompts`` chat prompts x ``max_tokens`` forced tokens through ``llm`` after an
    untimed 8-prompt warm-up: output tok/s, wall and process CPU seconds, batches per stage."""
    chats = [
        [{"role": "user", "content": f"Write a short paragraph about topic {i}."}]
        for i in range(num_prompts)
    ]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    llm.generate([{"messages": m} for m in chats[:8]], params)
    loop = llm.llm_engine.loop
    before = dict(loop.num_batches)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    outs = llm.generate([{"messages": m} for m in chats], params)
    wall_s, cpu_s = time.perf_counter() - wall0, time.process_time() - cpu0
    tokens = sum(len(o.output_token_ids) for o in outs)
    return {
        "output_tok_s": round(tokens / wall_s, 1),
        "wall_s": round(wall_s, 2),
        "process_cpu_s": round(cpu_s, 2),
        "batches": {s.value: loop.num_batches[s] - before[s] for s in before},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", default="multi_stream")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--num-prompts", type=int, default=64)
    args = ap.parse_args()
    llm = LLM(str(export_text_model()), dtype=args.dtype, policy=args.policy)
    run = timed_generate(llm, args.max_tokens, args.num_prompts)
    print(
        json.dumps(
            {
                "policy": args.policy,
                "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
                **run,
                "loadavg_1min": round(os.getloadavg()[0], 2),
            }
        ),
        flush=True,
    )
    os._exit(0)  # (skips the engine's shutdown: nothing to flush)


if __name__ == "__main__":
    main()
