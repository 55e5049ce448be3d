"""A profile in a few lines for humans. Torch-free."""

from __future__ import annotations

from typing import Any


def summarize(profile: dict[str, Any]) -> str:
    """A few lines for humans: the corners of each table and the co-running factors."""
    meta = profile.get("metadata", {})
    lines = [
        f"profile of {meta.get('model')} on {meta.get('device_name')} "
        f"({meta.get('dtype')}, torch {meta.get('torch_version')}, "
        f"{meta.get('profiling_wall_s')} s)"
    ]
    for stage, table in profile["stages"].items():
        grid, lat = table["grid"], table["latency_s"][-1]
        if len(grid) == 1:
            cells = ", ".join(f"{x:g}: {v * 1e3:.1f} ms" for x, v in zip(grid[0], lat))
        else:
            cells = ", ".join(
                f"({x:g}, {y:g}): {lat[i][j] * 1e3:.1f} ms"
                for i, x in enumerate(grid[0])
                for j, y in enumerate(grid[1])
                if i in (0, len(grid[0]) - 1) and j in (0, len(grid[1]) - 1)
            )
        lines.append(f"  {stage} {tuple(table['axes'])}: {cells}")
    for stage, row in profile.get("corun_factor", {}).items():
        lines.append(f"  corun {stage}: " + ", ".join(f"with {o} x{f:.2f}" for o, f in row.items()))
    return "\n".join(lines)
