"""Trace replay: Azure LMM 2025, Mooncake and BurstGPT request traces as open-loop workloads.

A trace gives each request's arrival time and token counts, not its text: the chat text is
synthesised (seeded) so that :func:`nova.workload.text_tokens_estimate` of it is about the
trace's input length, and images are synthetic screenshots of a configurable size.

Reading is forgiving: a malformed row (bad number, missing field, broken JSON, ...) is skipped
and counted in the workload's ``notes``; only a missing file or a file with no valid row is a
``ValueError``. Rows are taken in file order (the first ``max_requests`` valid ones), then
sorted by timestamp (stable) and re-timed:

* ``start_at_zero`` (default): the first arrival is at 0 s; otherwise the trace's own clock
  (seconds; datetimes as seconds since the Unix epoch, UTC) is kept.
* ``time_scale``: multiply inter-arrival times (2.0 = half the rate).
* ``rate_rps``: instead of ``time_scale``, scale so the mean rate, (n-1)/(last-first), is this.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from nova.workload.arrivals import split_rng
from nova.workload.gui_agent import filler_words, text_for_tokens, words_for_tokens
from nova.workload.registry import check_int, check_positive, check_seed, register_workload
from nova.workload.types import ImageSpec, Workload, WorkloadRequest

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
SAMPLE_TRACES: dict[str, Path] = {
    "azure_lmm": SAMPLES_DIR / "azure_lmm_sample.csv",
    "mooncake": SAMPLES_DIR / "mooncake_sample.jsonl",
    "burstgpt": SAMPLES_DIR / "burstgpt_sample.csv",
}
MOONCAKE_BLOCK_TOKENS = 512  # tokens per Mooncake hash id (prefix-cache block)
DEFAULT_IMAGE_SIZE = 1120


@dataclass(slots=True, frozen=True)
class TraceRow:
    """One valid trace row. ``timestamp_s``: the trace's clock, seconds."""

    timestamp_s: float
    num_input_tokens: int
    num_output_tokens: int
    num_images: int = 0
    hash_ids: tuple[int, ...] = ()


class SkipRow(Exception):
    """A well-formed row the reader leaves out on purpose; ``reason`` is counted in the notes."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class _Scan:
    rows: list[TraceRow] = field(default_factory=list)
    num_lines: int = 0
    num_malformed: int = 0
    first_error: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: bool = False

    def notes(self, file_name: str) -> list[str]:
        out = [f"read {len(self.rows)} requests from {file_name} ({self.num_lines} data rows read)"]
        if self.num_malformed:
            out.append(f"skipped {self.num_malformed} malformed rows (first: {self.first_error})")
        out += [f"skipped {n} rows: {reason}" for reason, n in self.skipped.items()]
        if self.truncated:
            out.append(f"stopped at max_requests={len(self.rows)}")
        return out


# --- field parsing ----------------------------------------------------------------------------

_DATETIME = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?\s*(Z|[+-]\d{2}:?\d{2})?$"
)


def parse_timestamp_s(value: Any) -> float:
    """Seconds from a number (seconds) or a datetime string such as
    ``2025-05-20 00:00:00.0120000`` (any number of fractional digits; naive = UTC), as seconds
    since the Unix epoch."""
    if isinstance(value, bool):
        raise ValueError(f"bad timestamp {value!r}")
    if isinstance(value, (int, float)):
        return _finite(float(value), "timestamp")
    text = str(value).strip()
    try:
        return _finite(float(text), "timestamp")
    except ValueError:
        pass
    m = _DATETIME.match(text)
    if m is None:
        raise ValueError(f"bad timestamp {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    tz = UTC
    if m.group(8) and m.group(8) != "Z":
        sign = -1 if m.group(8)[0] == "-" else 1
        digits = m.group(8)[1:].replace(":", "")
        tz = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    whole_s = datetime(year, month, day, hour, minute, second, tzinfo=tz).timestamp()
    return whole_s + (float("0." + m.group(7)) if m.group(7) else 0.0)


def _finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name} is not finite: {value!r}")
    return value


def parse_count(value: Any, name: str, minimum: int = 0) -> int:
    """A non-negative integer from an int, an integral float or their text ("12", "12.0")."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name}: not a number: {value!r}")
    number = float(value) if not isinstance(value, int) else value
    if isinstance(number, float) and (not math.isfinite(number) or not number.is_integer()):
        raise ValueError(f"{name}: not an integer: {value!r}")
    count = int(number)
    if count < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {count}")
    return count


# --- reading files ----------------------------------------------------------------------------


def _check_path(path: Any) -> Path:
    if path is None or not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a file path, got {path!r}")
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"path: trace file not found: {file}")
    return file


def _data_lines(file: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for each non-blank line."""
    with file.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                yield line_no, line.rstrip("\r\n")


def _csv_records(
    file: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> Iterator[tuple[int, dict[str, str | None]]]:
    """(line number, {column: text}) per data row of a CSV file; columns matched
    case-insensitively, named as in ``required``/``optional``; only columns present in the
    header are keys. A cell missing from a short row is ``None`` (the parser then rejects it)."""
    lines = _data_lines(file)
    first = next(lines, None)
    if first is None:
        raise ValueError(f"no valid rows in trace file {file} (it is empty)")
    header = [h.strip().lower() for h in next(csv.reader([first[1]]))]
    missing = [c for c in required if c.lower() not in header]
    if missing:
        raise ValueError(
            f"no valid rows in trace file {file}: missing column(s) {missing}; "
            f"header is {first[1]!r}"
        )
    wanted = {c: header.index(c.lower()) for c in required + optional if c.lower() in header}
    for line_no, line in lines:
        cells = next(csv.reader([line]), [])
        yield line_no, {c: cells[i].strip() if i < len(cells) else None for c, i in wanted.items()}


def _jsonl_records(file: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON or the raw line if it does not parse) per non-blank line."""
    for line_no, line in _data_lines(file):
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError:
            yield line_no, line  # the parser rejects a str


def _scan(
    file: Path,
    records: Iterator[tuple[int, Any]],
    parse: Callable[[Any], TraceRow],
    max_requests: int | None,
) -> _Scan:
    scan = _Scan()
    for line_no, record in records:
        scan.num_lines += 1
        try:
            row = parse(record)
        except SkipRow as skip:
            scan.skipped[skip.reason] = scan.skipped.get(skip.reason, 0) + 1
            continue
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            scan.num_malformed += 1
            if scan.first_error is None:
                scan.first_error = f"line {line_no}: {type(exc).__name__}: {exc}"
            continue
        scan.rows.append(row)
        if max_requests is not None and len(scan.rows) >= max_requests:
            scan.truncated = True
            break
    if not scan.rows:
        detail = "; ".join(scan.notes(file.name)[1:]) or "no data rows"
        raise ValueError(f"no valid rows in trace file {file} ({detail})")
    return scan


# --- re-timing ----------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class ReplayOptions:
    """Checked replay parameters shared by every trace reader."""

    max_requests: int | None = None
    time_scale: float = 1.0
    rate_rps: float | None = None
    start_at_zero: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_requests is not None:
            check_int("max_requests", self.max_requests, 1)
        check_positive("time_scale", self.time_scale)
        if self.rate_rps is not None:
            check_positive("rate_rps", self.rate_rps)
            if self.time_scale != 1.0:
                raise ValueError("rate_rps: give either rate_rps or time_scale, not both")
        if not isinstance(self.start_at_zero, bool):
            raise ValueError(f"start_at_zero must be a bool, got {self.start_at_zero!r}")
        check_seed(self.seed)


def retime_s(times_s: list[float], opts: ReplayOptions) -> tuple[list[float], float]:
    """Sorted trace times -> (arrival times in seconds, the factor applied to gaps)."""
    t0 = times_s[0]
    factor = opts.time_scale
    if opts.rate_rps is not None:
        span_s = times_s[-1] - t0
        if len(times_s) < 2 or span_s <= 0:
            raise ValueError(
                f"rate_rps: cannot rescale {len(times_s)} arrival(s) spanning {span_s:g} s "
                "to a rate"
            )
        factor = (len(times_s) - 1) / (span_s * opts.rate_rps)
    origin = 0.0 if opts.start_at_zero else t0
    return [origin + (t - t0) * factor for t in times_s], factor


def _sorted_rows(rows: list[TraceRow], notes: list[str]) -> list[TraceRow]:
    out_of_order = sum(1 for a, b in itertools.pairwise(rows) if b.timestamp_s < a.timestamp_s)
    if not out_of_order:
        return rows
    notes.append(f"sorted rows by timestamp ({out_of_order} were out of order)")
    return sorted(rows, key=lambda r: r.timestamp_s)


def _replay(
    name: str,
    file: Path,
    scan: _Scan,
    opts: ReplayOptions,
    notes: list[str],
    instruction: Callable[[random.Random, TraceRow], str],
    image: ImageSpec,
    images_per_request: int | None,
) -> Workload:
    """The workload of the scanned rows: re-timed, with ``instruction(rng, row)`` as the text
    (``num_text_tokens`` = the row's input tokens, ``max_tokens`` its output tokens) and
    ``images_per_request`` copies of ``image`` (None: the row's own image count)."""
    notes = scan.notes(file.name) + notes
    rows = _sorted_rows(scan.rows, notes)
    arrivals_s, factor = retime_s([r.timestamp_s for r in rows], opts)
    if opts.rate_rps is not None:
        notes.append(
            f"scaled inter-arrival times by {factor:.6g} for a mean rate of {opts.rate_rps:g} req/s"
        )
    _, content_rng = split_rng(opts.seed)

    def images(row: TraceRow) -> tuple[ImageSpec, ...]:
        return (image,) * (row.num_images if images_per_request is None else images_per_request)

    requests = tuple(
        WorkloadRequest(
            request_id=f"{name}-{i:06d}",
            arrival_s=arrival_s,
            instruction=instruction(content_rng, row),
            num_text_tokens=row.num_input_tokens,
            images=images(row),
            max_tokens=row.num_output_tokens,
            seed=content_rng.getrandbits(31),
        )
        for i, (arrival_s, row) in enumerate(zip(arrivals_s, rows))
    )
    return Workload(name=name, requests=requests, notes=tuple(notes))


def _synthetic_text(rng: random.Random, row: TraceRow) -> str:
    return text_for_tokens(rng, row.num_input_tokens)


def _image(width: Any, height: Any) -> ImageSpec:
    """The screenshot every request of a trace carries, its size checked."""
    check_int("image_width", width, 1)
    check_int("image_height", height, 1)
    return ImageSpec(width, height)


# --- Azure LMM 2025 -----------------------------------------------------------------------------


def _parse_azure(record: dict[str, str | None]) -> TraceRow:
    return TraceRow(
        timestamp_s=parse_timestamp_s(record["TIMESTAMP"]),
        num_input_tokens=parse_count(record["ContextTokens"], "ContextTokens", 1),
        num_output_tokens=parse_count(record["GeneratedTokens"], "GeneratedTokens", 1),
        num_images=parse_count(record["NumImages"], "NumImages") if "NumImages" in record else 0,
    )


@register_workload("azure_lmm")
def azure_lmm(
    *,
    path: str | os.PathLike[str],
    max_requests: int | None = None,
    time_scale: float = 1.0,
    rate_rps: float | None = None,
    start_at_zero: bool = True,
    image_width: int = DEFAULT_IMAGE_SIZE,
    image_height: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
) -> Workload:
    """Replay an Azure LMM 2025 trace: CSV ``TIMESTAMP,NumImages,ContextTokens,GeneratedTokens``.

    TIMESTAMP is a datetime (``2025-05-20 00:00:00.0120000``) or seconds. Each request has
    NumImages screenshots of ``image_width`` x ``image_height`` and ``max_tokens`` =
    GeneratedTokens. ``num_text_tokens`` = ContextTokens, which in this trace *includes* the
    image tokens, so it (and the synthetic text, sized to it) over-counts the text part: the
    true text length depends on the model's image tokens, which the trace does not give.
    Without a NumImages column (Azure's text-only LLM traces) requests have no images.
    """
    opts = ReplayOptions(max_requests, time_scale, rate_rps, start_at_zero, seed)
    image = _image(image_width, image_height)
    file = _check_path(path)
    scan = _scan(
        file,
        _csv_records(file, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"), ("NumImages",)),
        _parse_azure,
        opts.max_requests,
    )
    notes = ["num_text_tokens = ContextTokens, which includes image tokens"]
    return _replay("azure_lmm", file, scan, opts, notes, _synthetic_text, image, None)


# --- Mooncake -----------------------------------------------------------------------------------


def _parse_mooncake(record: Any) -> TraceRow:
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object: {str(record)[:60]!r}")
    hash_ids = record.get("hash_ids", [])
    if not isinstance(hash_ids, list):
        raise ValueError(f"hash_ids is not a list: {hash_ids!r}")
    return TraceRow(
        timestamp_s=parse_timestamp_s(record["timestamp"]) / 1000.0,
        num_input_tokens=parse_count(record["input_length"], "input_length", 1),
        num_output_tokens=parse_count(record["output_length"], "output_length", 1),
        hash_ids=tuple(parse_count(h, "hash_ids") for h in hash_ids),
    )


class _BlockText:
    """Words standing for one Mooncake hash block (512 tokens): the same hash id gives the same
    words, so requests that share a prefix of hash ids share a text prefix (prefix caching)."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._words_per_block = round(MOONCAKE_BLOCK_TOKENS / 1.3)
        self._cache: dict[int, list[str]] = {}

    def words(self, hash_id: int) -> list[str]:
        if hash_id not in self._cache:
            rng = random.Random(f"mooncake-block:{self._seed}:{hash_id}")
            self._cache[hash_id] = filler_words(rng, self._words_per_block)
        return self._cache[hash_id]

    def text(self, rng: random.Random, row: TraceRow) -> str:
        num_words = words_for_tokens(row.num_input_tokens)
        words: list[str] = []
        for hash_id in row.hash_ids:
            if len(words) >= num_words:
                break
            words += self.words(hash_id)
        if len(words) < num_words:
            words += filler_words(rng, num_words - len(words))
        return " ".join(words[:num_words])


@register_workload("mooncake")
def mooncake(
    *,
    path: str | os.PathLike[str],
    max_requests: int | None = None,
    time_scale: float = 1.0,
    rate_rps: float | None = None,
    start_at_zero: bool = True,
    images_per_request: int = 0,
    image_width: int = DEFAULT_IMAGE_SIZE,
    image_height: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
) -> Workload:
    """Replay a Mooncake trace: JSONL lines ``{"timestamp": ms, "input_length": n,
    "output_length": m, "hash_ids": [...]}`` (timestamp in milliseconds).

    ``num_text_tokens`` = input_length, ``max_tokens`` = output_length. The text is built from
    one stand-in block of words per hash id (512 tokens each), so shared hash-id prefixes give
    shared text prefixes. Text only, unless ``images_per_request`` screenshots are asked for.
    """
    opts = ReplayOptions(max_requests, time_scale, rate_rps, start_at_zero, seed)
    check_int("images_per_request", images_per_request, 0)
    image = _image(image_width, image_height)
    file = _check_path(path)
    scan = _scan(file, _jsonl_records(file), _parse_mooncake, opts.max_requests)
    blocks = _BlockText(opts.seed)
    return _replay("mooncake", file, scan, opts, [], blocks.text, image, images_per_request)


# --- BurstGPT -----------------------------------------------------------------------------------

BURSTGPT_FAILED = "zero response tokens (failed requests)"


def _parse_burstgpt(model: str | None) -> Callable[[dict[str, str | None]], TraceRow]:
    def parse(record: dict[str, str | None]) -> TraceRow:
        row = TraceRow(
            timestamp_s=parse_timestamp_s(record["Timestamp"]),
            num_input_tokens=parse_count(record["Request tokens"], "Request tokens", 1),
            num_output_tokens=parse_count(record["Response tokens"], "Response tokens"),
        )
        if model is not None and (record.get("Model") or "").lower() != model.lower():
            raise SkipRow(f"model is not {model}")
        if row.num_output_tokens == 0:
            raise SkipRow(BURSTGPT_FAILED)
        return row

    return parse


@register_workload("burstgpt")
def burstgpt(
    *,
    path: str | os.PathLike[str],
    max_requests: int | None = None,
    time_scale: float = 1.0,
    rate_rps: float | None = None,
    start_at_zero: bool = True,
    model: str | None = None,
    images_per_request: int = 0,
    image_width: int = DEFAULT_IMAGE_SIZE,
    image_height: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
) -> Workload:
    """Replay a BurstGPT trace: CSV ``Timestamp,Model,Request tokens,Response tokens,Total
    tokens,Log Type`` (Timestamp in seconds).

    Rows with zero response tokens are failed requests in BurstGPT: they are skipped and
    counted in ``notes``. ``model`` (e.g. ``"ChatGPT"``, ``"GPT-4"``) keeps only that model's
    rows. ``num_text_tokens`` = Request tokens, ``max_tokens`` = Response tokens. Text only,
    unless ``images_per_request`` screenshots are asked for.
    """
    opts = ReplayOptions(max_requests, time_scale, rate_rps, start_at_zero, seed)
    if model is not None and not isinstance(model, str):
        raise ValueError(f"model must be a string, got {model!r}")
    check_int("images_per_request", images_per_request, 0)
    image = _image(image_width, image_height)
    file = _check_path(path)
    records = _csv_records(file, ("Timestamp", "Request tokens", "Response tokens"), ("Model",))
    scan = _scan(file, records, _parse_burstgpt(model), opts.max_requests)
    return _replay("burstgpt", file, scan, opts, [], _synthetic_text, image, images_per_request)
