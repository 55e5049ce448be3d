"""Synthetic, screenshot-like images for demos and benchmarks: a phone/desktop UI with a status
bar, a title, list rows, buttons and a text field. Deterministic for a given seed.
"""

from __future__ import annotations

import random
from typing import Any

APP_TITLES = ("Settings", "Messages", "Calendar", "Files", "Browser", "Contacts", "Clock")
ROW_LABELS = (
    "Wi-Fi",
    "Bluetooth",
    "Display",
    "Sound",
    "Battery",
    "Storage",
    "Privacy",
    "Notifications",
    "Accounts",
    "About phone",
    "Search",
    "Compose",
    "Inbox",
)


def make_screenshot(seed: int = 0, width: int = 360, height: int = 640) -> Any:
    """A PIL RGB image that looks like a mobile app screen."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    bg = (rng.randint(235, 255), rng.randint(235, 255), rng.randint(235, 255))
    accent = (rng.randint(20, 90), rng.randint(80, 160), rng.randint(160, 240))
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    bar = max(12, height // 30)
    draw.rectangle([0, 0, width, bar], fill=(30, 30, 30))
    draw.text((6, 1), f"12:{rng.randint(0, 59):02d}", fill=(255, 255, 255))
    draw.rectangle([0, bar, width, bar * 3], fill=accent)
    draw.text((12, bar + bar // 2), rng.choice(APP_TITLES), fill=(255, 255, 255))
    y = bar * 3 + 8
    row_h = max(20, height // 14)
    num_rows = max(0, min(len(ROW_LABELS), (height - y - 3 * row_h) // row_h))
    for label in rng.sample(ROW_LABELS, k=num_rows):
        draw.rectangle(
            [8, y, width - 8, y + row_h - 4], outline=(200, 200, 200), fill=(255, 255, 255)
        )
        draw.text((16, y + row_h // 3), label, fill=(20, 20, 20))
        if rng.random() < 0.4:  # a toggle switch
            on = rng.random() < 0.5
            draw.rounded_rectangle(
                [width - 56, y + 6, width - 16, y + row_h - 10],
                radius=8,
                fill=accent if on else (180, 180, 180),
            )
        y += row_h
    draw.rectangle([8, height - 2 * row_h, width - 8, height - row_h - 8], outline=(150, 150, 150))
    draw.text((16, height - 2 * row_h + row_h // 3), "Type a message", fill=(140, 140, 140))
    draw.rounded_rectangle(
        [width // 2 - 50, height - row_h, width // 2 + 50, height - 6], radius=10, fill=accent
    )
    draw.text((width // 2 - 14, height - row_h + row_h // 4), "OK", fill=(255, 255, 255))
    return img


def make_session_screenshot(seed: int, revision: int, width: int = 360, height: int = 640) -> Any:
    """The screen of one agent session (``seed``) after ``revision`` steps: the same app screen
    as ``make_screenshot(seed)`` with small step-to-step changes (the clock, where the last tap
    landed, text typed so far, one toggled switch), as consecutive screenshots of an agent's
    phone differ. Deterministic: equal arguments give byte-identical images."""
    from PIL import ImageDraw

    img = make_screenshot(seed, width, height)
    if revision == 0:
        return img
    rng = random.Random(seed * 1_000_003 + revision)
    draw = ImageDraw.Draw(img)
    bar = max(12, height // 30)
    row_h = max(20, height // 14)
    draw.rectangle([0, 0, width // 3, bar], fill=(30, 30, 30))  # the clock moves on
    draw.text((6, 1), f"12:{(seed + revision) % 60:02d}", fill=(255, 255, 255))
    x, y = rng.randint(8, width - 24), rng.randint(bar * 3, height - 3 * row_h)
    r = max(4, row_h // 4)
    draw.ellipse([x - r, y - r, x + r, y + r], outline=(220, 40, 40), width=2)  # last tap
    typed = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(min(revision, 24)))
    top = height - 2 * row_h
    draw.rectangle([9, top + 1, width - 9, height - row_h - 9], fill=(255, 255, 255))
    draw.text((16, top + row_h // 3), typed or "Type a message", fill=(20, 20, 20))
    toggle_y = bar * 3 + 8 + row_h * (revision % 5)
    draw.rounded_rectangle(
        [width - 56, toggle_y + 6, width - 16, toggle_y + row_h - 10],
        radius=8,
        fill=(40, 160, 90) if revision % 2 else (180, 180, 180),
    )
    return img
