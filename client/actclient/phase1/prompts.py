"""The tour-stop prompt: the user's tour-guide system prompt plus one stop named by Plus Code.

The system text is the user's own prompt (shared/data/tour_stop_prompt.md) with the tour
language filled in. The user message gives the stop as a Plus Code and its decoded coordinates,
so the model is told where it is in numbers it can reason about, plus the group's interests and
the style, whose token budget (STYLES) becomes the request's max_tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from actclient import pluscode

# Style name -> max tokens of the answer.
STYLES: dict[str, int] = {"brief": 200, "stimulate": 500, "detailed": 1500}

STYLE_GUIDANCE: dict[str, str] = {
    "brief": "a brief stop: name the place, share one vivid story or detail, and say what to "
    "look at right now",
    "stimulate": "a stimulating stop: open with a surprising hook, give the history and details "
    "that matter, and end with a question for the group or a natural next step",
    "detailed": "a detailed stop: history, architecture, nature, food, the native people and "
    "their stories, what to expect of daylight, weather and season, how to get to the next "
    "stop, and natural next steps",
}

# ISO 639-1 code -> language name used in the prompt.
LANGUAGE_NAMES: dict[str, str] = {
    "ar": "Arabic",
    "ca": "Catalan",
    "cs": "Czech",
    "da": "Danish",
    "de": "German",
    "el": "Greek",
    "en": "English",
    "es": "Spanish",
    "fi": "Finnish",
    "fr": "French",
    "he": "Hebrew",
    "hi": "Hindi",
    "hu": "Hungarian",
    "id": "Indonesian",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "ms": "Malay",
    "nl": "Dutch",
    "no": "Norwegian",
    "pl": "Polish",
    "pt": "Portuguese",
    "ru": "Russian",
    "sv": "Swedish",
    "sw": "Swahili",
    "th": "Thai",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "vi": "Vietnamese",
    "zh": "Chinese",
}

# The user's prompt, verbatim, one bullet per line (kept as a list to fit the line length).
TOUR_GUIDE_PROMPT = "\n".join(
    [
        "You are an engaging, extremely knowledgeable tour guide.",
        "As a professional tour guide you:",
        "- Include specific details about points of interest, architecture, history, and "
        "cultural significance",
        "- Include natural and geographical and plant / animal factoids when applicable",
        "- You are a steward of life and diversity on earth",
        "- You understand the best ways to transit from one place to another, time and distance",
        "- Makes daylight, temperature, and season expectations based on the timestamp + geocode "
        "from generated data",
        "- Know the name of and address native people and know about their language and stories",
        "- Have intimate and nuanced knowledge of historical and recent events",
        "- Have a spirit of adventure!",
        "- Know lots about food and traditional cooking and flavors",
        "- Understand needs of families and large groups",
        "- Offer natural next steps when your tour stop complete",
        "This particular tour will be given in {language}.",
    ]
)


def language_name(code: str) -> str:
    """Map an ISO 639-1 code (e.g. 'fr') to the language name used in prompts ('French')."""
    try:
        return LANGUAGE_NAMES[code.lower()]
    except KeyError:
        known = ", ".join(sorted(LANGUAGE_NAMES))
        raise ValueError(f"unknown language code {code!r}; known codes: {known}") from None


def check_style(style: str) -> int:
    """Return the max tokens of `style`; raise ValueError naming the field and allowed values."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}; got {style!r}")
    return STYLES[style]


@dataclass(frozen=True)
class TourStopPrompt:
    """One tour-stop request: system and user text, the answer's token budget, and the stop."""

    system: str
    user: str
    max_tokens: int
    plus_code: str
    lat: float
    lng: float

    def messages(self) -> list[dict[str, str]]:
        """The prompt as OpenAI chat messages."""
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]


def build_prompt(
    plus_code: str,
    interests: Sequence[str],
    style: str = "stimulate",
    country: str = "Australia",
    language: str = "English",
    reference: tuple[float, float] | None = None,
) -> TourStopPrompt:
    """Build the tour-stop prompt for the stop at `plus_code`.

    A short code needs `reference=(lat, lng)` to recover the full code (else PlusCodeError).
    An empty `country` leaves the country out; empty `interests` means general sightseeing.
    """
    max_tokens = check_style(style)
    if not language.strip():
        raise ValueError("language must be a language name such as 'English'; got ''")
    if isinstance(interests, str):
        interests = [interests]
    full = pluscode.parse(plus_code, reference)
    area = pluscode.decode(full)
    # 5 decimals (about 1 m) is finer than a 10-digit cell and never a rounding tie there.
    lat, lng = round(area.center_lat, 5), round(area.center_lng, 5)
    where = f"Plus Code {full} (latitude {lat:.5f}, longitude {lng:.5f})"
    if country:
        where += f" in {country}"
    topics = ", ".join(i.strip() for i in interests if i.strip()) or "general sightseeing"
    user = (
        f"Our next tour stop is at {where}.\n"
        f"The group is especially interested in: {topics}.\n"
        f"Style: {style}. Make this {STYLE_GUIDANCE[style]}. "
        f"Keep it within about {max_tokens} tokens.\n"
        "Welcome the group to this stop and give the tour."
    )
    return TourStopPrompt(
        system=TOUR_GUIDE_PROMPT.format(language=language),
        user=user,
        max_tokens=max_tokens,
        plus_code=full,
        lat=lat,
        lng=lng,
    )
