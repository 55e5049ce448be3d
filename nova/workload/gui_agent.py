"""GUI-agent request content, AndroidLab/AITW style: a phone task instruction, the agent's
previous actions, one screenshot, and a short action (30-80 tokens) to generate.

Everything is drawn from a ``random.Random`` passed in, so a workload's seed fixes it all.
The instruction catalogue is built once, in a fixed order, from hand-written tasks plus
templates (apps x actions x slot values).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from itertools import cycle, islice
from typing import Any

from nova.workload.registry import check_int, check_positive
from nova.workload.types import ImageSpec, WorkloadRequest

TOKENS_PER_WORD = 1.3
CHAT_TEMPLATE_TOKENS = 40  # chat template + a short system prompt


def text_tokens_estimate(text: str) -> int:
    """Estimated prompt tokens of ``text`` sent as one chat message: ~1.3 tokens per
    whitespace-separated word, plus 40 for the chat template and system prompt."""
    return CHAT_TEMPLATE_TOKENS + math.ceil(TOKENS_PER_WORD * len(text.split()))


@dataclass(slots=True, frozen=True)
class GuiTask:
    """A phone task: the app, the instruction, UI labels an agent taps on the way, and text it
    types (quoted spans of the instruction)."""

    app: str
    instruction: str
    targets: tuple[str, ...]
    typed: tuple[str, ...] = ()


# (app, instruction, UI labels on the way). Quoted spans ('...') are what the agent types.
_HAND_WRITTEN: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Settings", "Open Settings and turn on Wi-Fi", ("Network & internet", "Internet", "Wi-Fi")),
    ("Settings", "Turn off Bluetooth in Settings", ("Connected devices", "Bluetooth")),
    ("Settings", "Set the screen timeout to 2 minutes", ("Display", "Screen timeout", "2 minutes")),
    ("Settings", "Enable dark theme", ("Display", "Dark theme")),
    ("Settings", "Turn on battery saver", ("Battery", "Battery Saver", "Use Battery Saver")),
    (
        "Settings",
        "Change the phone's language to Spanish",
        ("System", "Languages & input", "Languages", "Add a language", "Español"),
    ),
    (
        "Settings",
        "Increase the font size to the largest setting",
        ("Display", "Font size", "Largest"),
    ),
    ("Settings", "Turn on airplane mode", ("Network & internet", "Airplane mode")),
    ("Settings", "Check how much storage is left on the phone", ("Storage", "Internal storage")),
    (
        "Settings",
        "Turn off notifications for Instagram",
        ("Notifications", "App notifications", "Instagram", "All Instagram notifications"),
    ),
    (
        "Settings",
        "Set the ringtone to 'Pixel Sounds'",
        ("Sound & vibration", "Phone ringtone", "Pixel Sounds"),
    ),
    ("Settings", "Mute media volume", ("Sound & vibration", "Media volume")),
    ("Messages", "In Messages, reply 'on my way' to Alice", ("Alice", "Text message", "Send")),
    (
        "Messages",
        "Delete the conversation with +1 650-555-0134 in Messages",
        ("+1 650-555-0134", "Delete", "Delete"),
    ),
    ("Messages", "Mark all messages as read", ("More options", "Mark all as read")),
    (
        "Contacts",
        "Add a new contact named 'Maria Lopez' with phone number '415-555-0199'",
        ("Create contact", "First name", "Phone", "Save"),
    ),
    ("Contacts", "Add Bob to favorites in Contacts", ("Bob", "Favorite")),
    (
        "Contacts",
        "Change David's email address to 'david.k@example.com'",
        ("David", "Edit", "Email", "Save"),
    ),
    ("Clock", "Set a timer for 15 minutes", ("Timer", "1", "5", "Start")),
    ("Clock", "Turn off all alarms in Clock", ("Alarm", "7:00 AM", "8:30 AM")),
    ("Clock", "Start the stopwatch", ("Stopwatch", "Start")),
    ("Clock", "Add London to the world clock", ("Clock", "Add city", "London")),
    ("Calendar", "Delete the event 'Dentist' on Friday", ("Friday", "Dentist", "Delete")),
    ("Calendar", "Show my schedule for next week in Calendar", ("Menu", "Week", "Next week")),
    (
        "Gmail",
        "Search Gmail for emails from 'newsletter@shop.com' and archive them",
        ("Search in mail", "Select all", "Archive"),
    ),
    (
        "Gmail",
        "Compose an email to 'team@company.com' with subject 'Weekly sync'",
        ("Compose", "To", "Subject", "Send"),
    ),
    ("Gmail", "Star the most recent email from Carol", ("Carol", "Star")),
    (
        "Chrome",
        "Open Chrome and search for 'weather tomorrow in Seattle'",
        ("Search or type web address", "Go"),
    ),
    (
        "Chrome",
        "Clear the browsing history in Chrome",
        ("More options", "History", "Clear browsing data", "Clear data"),
    ),
    ("Chrome", "Bookmark the current page in Chrome", ("More options", "Bookmark")),
    ("Chrome", "Open a new incognito tab", ("More options", "New Incognito tab")),
    ("Maps", "Find the nearest gas station in Maps", ("Search here", "Gas stations")),
    (
        "Maps",
        "Save 'Golden Gate Park' as a favorite place in Maps",
        ("Search here", "Golden Gate Park", "Save", "Favorites"),
    ),
    (
        "YouTube",
        "Search YouTube for 'how to repot a succulent' and play the first video",
        ("Search", "how to repot a succulent"),
    ),
    ("YouTube", "Subscribe to the channel of the video that is playing", ("Subscribe",)),
    (
        "Spotify",
        "Play the playlist 'Discover Weekly' in Spotify",
        ("Your Library", "Discover Weekly", "Play"),
    ),
    ("Spotify", "Turn on shuffle in Spotify", ("Now playing", "Shuffle")),
    ("Camera", "Switch the camera to video mode and start recording", ("Video", "Record")),
    ("Photos", "Delete the most recent photo in Photos", ("Photos", "Delete", "Move to trash")),
    ("Photos", "Create an album named 'Hiking 2024' in Photos", ("Library", "New album", "Done")),
    (
        "Files",
        "Rename 'report_final.pdf' in Downloads to 'report_v2.pdf'",
        ("Downloads", "report_final.pdf", "Rename", "OK"),
    ),
    (
        "Files",
        "Move 'IMG_2031.jpg' from Downloads to the Pictures folder",
        ("Downloads", "IMG_2031.jpg", "Move to", "Pictures", "Move here"),
    ),
    (
        "Notes",
        "Create a note titled 'Groceries' with 'milk, eggs, spinach'",
        ("New note", "Title", "Note", "Save"),
    ),
    (
        "Calculator",
        "Use the calculator to compute 17.5% of 240",
        ("2", "4", "0", "×", "1", "7", ".", "5", "%", "="),
    ),
    (
        "Play Store",
        "Install the app 'Duolingo' from the Play Store",
        ("Search for apps & games", "Duolingo", "Install"),
    ),
    (
        "Play Store",
        "Update all apps in the Play Store",
        ("Profile", "Manage apps & device", "Update all"),
    ),
    (
        "Recorder",
        "Start a new voice recording and save it as 'Lecture 3'",
        ("Record", "Stop", "Save"),
    ),
    (
        "Weather",
        "Check the weather forecast for Tokyo this weekend",
        ("Search", "Tokyo", "Weekend"),
    ),
    (
        "Uber",
        "Request a ride to 'San Francisco International Airport'",
        ("Where to?", "Confirm UberX"),
    ),
    (
        "Amazon",
        "Add a pack of AA batteries to the cart on Amazon",
        ("Search Amazon", "AA batteries", "Add to Cart"),
    ),
)

_CONTACTS = ("Alice", "Bob", "Carol", "David", "Priya", "Chen Wei", "Mom", "Tom Baker")
_MESSAGES = (
    "on my way",
    "running 10 minutes late",
    "see you at 7",
    "can you call me back?",
    "thanks, got it",
    "happy birthday!",
)
_TIMES = ("6:30 AM", "7:15 AM", "8:00 AM", "12:45 PM", "5:30 PM", "9:00 PM")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
_EVENTS = ("Team standup", "Dentist", "Gym", "Lunch with Sam", "Flight to Boston", "Book club")
_SETTINGS = (
    ("Wi-Fi", "Network & internet"),
    ("Bluetooth", "Connected devices"),
    ("Location", "Location"),
    ("Do Not Disturb", "Sound & vibration"),
    ("Auto-rotate", "Display"),
    ("NFC", "Connected devices"),
)
_PLACES = (
    "Central Park",
    "the nearest pharmacy",
    "Union Station",
    "Blue Bottle Coffee",
    "Stanford Shopping Center",
    "the closest EV charger",
)

# (app, instruction template, targets template); slots are filled in lockstep (cycled).
_TEMPLATES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Messages", "In Messages, reply '{msg}' to {contact}", ("{contact}", "Text message", "Send")),
    (
        "Messages",
        "Send '{msg}' to {contact} in Messages",
        ("Start chat", "{contact}", "Text message", "Send"),
    ),
    ("Phone", "Call {contact} from the Phone app", ("Contacts", "{contact}", "Call")),
    ("Clock", "Set an alarm for {time} in Clock", ("Alarm", "Add alarm", "{time}", "OK")),
    (
        "Calendar",
        "Create an event '{event}' on {day} at {time} in Calendar",
        ("Create", "Event", "Title", "{day}", "{time}", "Save"),
    ),
    ("Settings", "Open Settings and turn on {setting}", ("{section}", "{setting}")),
    ("Settings", "Open Settings and turn off {setting}", ("{section}", "{setting}")),
    (
        "Maps",
        "Search for {place} in Maps and start navigation",
        ("Search here", "{place}", "Directions", "Start"),
    ),
)
_PER_TEMPLATE = 6


def _fill(template: str, slots: dict[str, str]) -> str:
    return template.format(**slots)


def _templated_tasks() -> list[tuple[str, str, tuple[str, ...]]]:
    out: list[tuple[str, str, tuple[str, ...]]] = []
    for t_idx, (app, text, targets) in enumerate(_TEMPLATES):
        # A different phase per template so slot combinations vary across templates.
        rows = islice(
            zip(
                cycle(_CONTACTS[t_idx % 3 :] + _CONTACTS[: t_idx % 3]),
                cycle(_MESSAGES),
                cycle(_TIMES),
                cycle(_DAYS),
                cycle(_EVENTS),
                cycle(_SETTINGS),
                cycle(_PLACES),
            ),
            _PER_TEMPLATE,
        )
        for contact, msg, time, day, event, (setting, section), place in rows:
            slots = dict(
                contact=contact,
                msg=msg,
                time=time,
                day=day,
                event=event,
                setting=setting,
                section=section,
                place=place,
            )
            out.append((app, _fill(text, slots), tuple(_fill(t, slots) for t in targets)))
    return out


def _build_tasks() -> tuple[GuiTask, ...]:
    seen: set[str] = set()
    tasks: list[GuiTask] = []
    for app, text, targets in list(_HAND_WRITTEN) + _templated_tasks():
        if text in seen:
            continue
        seen.add(text)
        tasks.append(
            GuiTask(app, text, targets, tuple(re.findall(r"(?<!\w)'([^']+)'(?!\w)", text)))
        )
    return tuple(tasks)


GUI_TASKS: tuple[GuiTask, ...] = _build_tasks()
GUI_INSTRUCTIONS: tuple[str, ...] = tuple(t.instruction for t in GUI_TASKS)


@dataclass(slots=True, frozen=True)
class GuiContentConfig:
    """What a generated GUI-agent request carries.

    ``image_width``/``image_height``: screenshot size in pixels (default 1120x1120, the
    Nova paper's CogAgent setup); ``images_per_request``: screenshots per request (0 = text
    only). Output tokens are uniform in [``min_tokens``, ``max_tokens``]. Open-loop requests
    carry a history of 0..``max_history_actions`` previous actions (uniform).
    ``deadline_s``/``priority`` are copied onto every request.
    """

    image_width: int = 1120
    image_height: int = 1120
    images_per_request: int = 1
    min_tokens: int = 30
    max_tokens: int = 80
    max_history_actions: int = 4
    deadline_s: float | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        check_int("image_width", self.image_width, 1)
        check_int("image_height", self.image_height, 1)
        check_int("images_per_request", self.images_per_request, 0)
        check_int("min_tokens", self.min_tokens, 1)
        check_int("max_tokens", self.max_tokens, 1)
        if self.max_tokens < self.min_tokens:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) must be >= min_tokens ({self.min_tokens})"
            )
        check_int("max_history_actions", self.max_history_actions, 0)
        if self.deadline_s is not None:
            check_positive("deadline_s", self.deadline_s)
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ValueError(f"priority must be an integer, got {self.priority!r}")

    def images(self) -> tuple[ImageSpec, ...]:
        return (ImageSpec(self.image_width, self.image_height),) * self.images_per_request

    def image_tokens(self, model: Any) -> int:
        """Prompt tokens of one screenshot for ``model`` (a ``ModelSpec`` or shipped name):
        from the screenshot's resolution for dynamic-resolution models (Qwen2-VL/2.5-VL),
        the model's fixed count otherwise."""
        return image_tokens_for(model, ImageSpec(self.image_width, self.image_height))


def image_tokens_for(model: Any, image: ImageSpec) -> int:
    """Image tokens ``image`` becomes in ``model``'s prompt (``ModelSpec`` or shipped name).

    Qwen2-VL / Qwen2.5-VL resize each image within the model's ``min_pixels``/``max_pixels`` to
    multiples of 28 pixels and merge 2x2 patches of 14 pixels into a token, so a 1920x1080
    screenshot becomes 2691 tokens and a 1120x1120 one 1600; fixed-size towers (LLaVA,
    CogAgent) give the same count for every image. Raises ``ValueError`` for an image the
    model cannot take within its limits."""
    from nova.cost.model_spec import get_model_spec

    return get_model_spec(model).image_tokens_for(image.width, image.height)


def prompt_tokens_for(model: Any, request: WorkloadRequest) -> int:
    """Prompt tokens of ``request`` for ``model``: its text estimate plus each image's tokens
    at its own resolution."""
    return request.num_text_tokens + sum(image_tokens_for(model, img) for img in request.images)


def next_action(rng: random.Random, task: GuiTask, step: int) -> str:
    """The action an agent doing ``task`` takes at ``step`` (0-based), as AndroidLab-style text:
    ``open_app("Settings")``, ``tap("Wi-Fi")``, ``type("on my way")``, ``scroll(down)``, ..."""
    if step == 0 and rng.random() < 0.7:
        return f'open_app("{task.app}")'
    u = rng.random()
    if u < 0.55 and task.targets:
        # Mostly follow the task's path, sometimes a label out of order.
        idx = step - 1 if rng.random() < 0.7 else rng.randrange(len(task.targets))
        return f'tap("{task.targets[min(max(idx, 0), len(task.targets) - 1)]}")'
    if u < 0.70 and task.typed:
        return f'type("{rng.choice(task.typed)}")'
    if u < 0.85:
        return f"scroll({rng.choice(('down', 'down', 'up'))})"
    if u < 0.90:
        return f"swipe({rng.choice(('left', 'right'))})"
    if u < 0.95:
        return f"press({rng.choice(('back', 'home'))})"
    if task.targets and rng.random() < 0.5:
        return f'long_press("{rng.choice(task.targets)}")'
    return f"wait({rng.choice((1, 2))})"


def format_instruction(instruction: str, history: list[str] | tuple[str, ...]) -> str:
    """The chat text: the task, then the numbered previous actions (if any)."""
    if not history:
        return instruction
    lines = [instruction, "Previous actions:"]
    lines += [f"{i}. {action}" for i, action in enumerate(history, start=1)]
    return "\n".join(lines)


def random_history(rng: random.Random, task: GuiTask, max_actions: int) -> list[str]:
    """0..``max_actions`` (uniform) actions an agent took so far on ``task``."""
    return [next_action(rng, task, step) for step in range(rng.randint(0, max_actions))]


def gui_agent_request(
    rng: random.Random,
    request_id: str,
    arrival_s: float | None,
    content: GuiContentConfig,
    *,
    task: GuiTask | None = None,
    history: list[str] | None = None,
    session_id: str | None = None,
    step: int = 0,
    think_time_s: float = 0.0,
) -> WorkloadRequest:
    """One GUI-agent request. ``task`` is drawn from :data:`GUI_TASKS` when not given;
    ``history`` is :func:`random_history` when not given. ``num_text_tokens`` is
    :func:`text_tokens_estimate` of the final text; the screenshot seed comes from ``rng``."""
    if task is None:
        task = rng.choice(GUI_TASKS)
    if history is None:
        history = random_history(rng, task, content.max_history_actions)
    text = format_instruction(task.instruction, history)
    return WorkloadRequest(
        request_id=request_id,
        arrival_s=arrival_s,
        instruction=text,
        num_text_tokens=text_tokens_estimate(text),
        images=content.images(),
        max_tokens=rng.randint(content.min_tokens, content.max_tokens),
        session_id=session_id,
        step=step,
        think_time_s=think_time_s,
        deadline_s=content.deadline_s,
        priority=content.priority,
        seed=rng.getrandbits(31),
    )


# --- filler text for trace replay: sized to a token count -------------------------------------


def _word_pool() -> tuple[str, ...]:
    words: dict[str, None] = {}
    for task in GUI_TASKS:
        for text in (task.instruction, *task.targets):
            for w in re.findall(r"[A-Za-z]+(?:['-][A-Za-z]+)*", text):
                words.setdefault(w.lower(), None)
    return tuple(words)


WORD_POOL: tuple[str, ...] = _word_pool()


def words_for_tokens(num_tokens: int) -> int:
    """Words whose :func:`text_tokens_estimate` is about ``num_tokens`` (at least 1)."""
    return max(1, round((num_tokens - CHAT_TEMPLATE_TOKENS) / TOKENS_PER_WORD))


def filler_words(rng: random.Random, num_words: int) -> list[str]:
    """``num_words`` words drawn from the GUI vocabulary (stand-in screen text)."""
    return rng.choices(WORD_POOL, k=max(0, num_words))


def text_for_tokens(rng: random.Random, num_tokens: int) -> str:
    """A GUI-agent instruction padded with screen-like words so that
    :func:`text_tokens_estimate` of the result is about ``num_tokens`` (never below the
    instruction itself)."""
    instruction = rng.choice(GUI_INSTRUCTIONS)
    extra = words_for_tokens(num_tokens) - len(instruction.split()) - 2  # 2: "Screen text:"
    if extra <= 0:
        return instruction
    return instruction + "\nScreen text: " + " ".join(filler_words(rng, extra))
