"""CPU cost of preparing one screenshot request before the engine sees it: PNG decode
(``nova.server.media.open_image``) and the image processor (Qwen2-VL's PIL processor with the
published limits; the demo model's SigLIP processor), per screenshot size. Writes
``benchmarks/results/preprocess_cpu.{json,md}``. Median of ``--repeats`` warm runs."""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _png(width: int, height: int) -> bytes:
    import numpy as np
    from PIL import Image

    img = Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from nova.models.demo import make_image_processor
    from nova.server.media import open_image

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    processors = {
        "qwen2-vl": Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056),
        "siglip-224 (demo)": make_image_processor(),
    }
    rows = []
    for w, h in ((1920, 1080), (1280, 720), (1120, 1120)):
        data = _png(w, h)
        img = open_image(data, None)
        decode = _median_ms(lambda: open_image(data, None), args.repeats)
        for name, proc in processors.items():
            pre = _median_ms(lambda: proc(images=[img], return_tensors="pt"), args.repeats)
            rows.append(
                {
                    "size": f"{w}x{h}",
                    "png_kb": len(data) // 1024,
                    "processor": name,
                    "decode_ms": round(decode, 1),
                    "preprocess_ms": round(pre, 1),
                    "total_ms": round(decode + pre, 1),
                }
            )
    import torch

    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min": os.getloadavg()[0],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "preprocess_cpu.json").write_text(
        json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n"
    )
    lines = [
        "# Request preparation cost per screenshot (CPU, one thread)",
        "",
        f"Machine: {machine}. Median of {args.repeats} warm runs; random-noise PNGs.",
        "",
        "| size | PNG KiB | processor | decode ms | preprocess ms | total ms |",
        "|---|---:|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['size']} | {r['png_kb']} | {r['processor']} | {r['decode_ms']} | "
        f"{r['preprocess_ms']} | {r['total_ms']} |"
        for r in rows
    ]
    (args.out / "preprocess_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
