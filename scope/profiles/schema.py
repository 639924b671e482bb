"""The structured user profile a teacher writes and the student learns (U-SCOPE section 5.1, the ``y_u`` of Eq. 23).

A profile is chain-of-thought first (``reasoning``), then the profile proper: persona, app
preferences, location tendencies, temporal regularities, likely intents. The same pydantic model
validates every teacher's output, defines the JSON schema sent to remote endpoints, and (through
:func:`generation_schema`) the schema that ``outlines`` enforces token by token during local
generation: there the free categories and areas become enums of the cohort's own names, strings
get a length cap and integers a digit cap, so a constrained generation always terminates.

The model is strict (``extra="forbid"``): reasoning first (the CoT), then persona, app
preferences (share %), location tendencies (place, area, role, share %), temporal regularities and
likely intents. Local generation is constrained to a schema whose categories and areas are enums
of the cohort's names, with capped strings and integers so that decoding terminates.
"""

from __future__ import annotations

import copy
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PERIODS = ("night", "morning", "afternoon", "evening", "unknown")
WEEK_PATTERNS = ("more on weekdays", "more on weekends", "similar", "unknown")
LEVELS = ("low", "medium", "high", "unknown")
ROLES = ("home", "work", "transit", "leisure", "other")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AppPreference(_Strict):
    category: str = Field(min_length=1, max_length=40, description="app category name")
    share_pct: int = Field(ge=0, le=100, description="percent of the user's records")


class LocationTendency(_Strict):
    place: str = Field(min_length=1, max_length=12, description="'place 1' = most visited")
    area: str = Field(min_length=1, max_length=60, description="POI-cluster name of the place")
    role: Literal[ROLES]
    share_pct: int = Field(ge=0, le=100)


class TemporalRegularities(_Strict):
    peak_hours: list[int] = Field(max_length=3, description="hours of day (0-23), busiest first")
    most_active_period: Literal[PERIODS]
    week_pattern: Literal[WEEK_PATTERNS]
    sessions_per_day: int = Field(ge=0, le=999)
    regularity: Literal[LEVELS]


class Profile(_Strict):
    """Teacher chain-of-thought + structured profile (the assistant turn of the SFT data)."""

    reasoning: str = Field(min_length=1, max_length=1200)
    persona: str = Field(min_length=1, max_length=60)
    app_preferences: list[AppPreference] = Field(max_length=5)
    location_tendencies: list[LocationTendency] = Field(max_length=3)
    temporal_regularities: TemporalRegularities
    likely_intents: list[str] = Field(max_length=3)

    def to_json(self) -> str:
        """Compact JSON, keys in schema order (reasoning first): the assistant's answer."""
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=False, separators=(", ", ": "))

    def to_text(self) -> str:
        """A readable paragraph of the profile (no reasoning): what Sentence-BERT encodes (Eq. 24)."""
        t = self.temporal_regularities
        apps = ", ".join(f"{a.category} ({a.share_pct}%)" for a in self.app_preferences) or "none observed"
        places = ", ".join(f"{p.role} in a {p.area} area ({p.share_pct}%)" for p in self.location_tendencies) or "none observed"
        hours = ", ".join(f"{h}:00" for h in t.peak_hours) or "none"
        intents = "; ".join(self.likely_intents) or "none"
        return (f"Persona: {self.persona}. Apps: {apps}. Places: {places}. Most active in the {t.most_active_period}, "
                f"peak hours {hours}, {t.week_pattern}, about {t.sessions_per_day} sessions per day, "
                f"{t.regularity} regularity. Likely intents: {intents}.")

    def top_categories(self, k: int = 3) -> list[str]:
        ranked = sorted(self.app_preferences, key=lambda a: -a.share_pct)
        return [a.category for a in ranked[:k]]

    def top_areas(self, k: int = 3) -> list[str]:
        """Distinct areas of the listed places, in the order given (most visited first)."""
        out: list[str] = []
        for p in self.location_tendencies:
            if p.area not in out:
                out.append(p.area)
        return out[:k]


class ProfileError(ValueError):
    """A teacher or student output that is not a valid profile (with the reason)."""


def parse_answer(text: str, model: type[BaseModel]):
    """Parse a model's answer: the first JSON object in ``text``, validated against ``model``."""
    start = text.find("{")
    if start < 0:
        raise ProfileError("no JSON object in the output")
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as err:
        raise ProfileError(f"invalid JSON: {err}") from None
    try:
        return model.model_validate(obj)
    except ValidationError as err:
        first = err.errors()[0]
        raise ProfileError(f"schema violation at {'.'.join(map(str, first['loc'])) or '(root)'}: {first['msg']}") from None


def parse_profile(text: str) -> Profile:
    """Parse a model's answer as a :class:`Profile`."""
    return parse_answer(text, Profile)


def profile_json_schema() -> dict:
    """The plain JSON schema of :class:`Profile` (sent to OpenAI-compatible endpoints)."""
    return Profile.model_json_schema()


def generation_schema(categories: list[str] | None = None, areas: list[str] | None = None,
                      max_chars: int | None = None) -> dict:
    """A self-contained JSON schema for constrained decoding (``outlines``).

    Categories and areas become enums of the cohort's names, every string is capped at
    ``max_chars`` characters and every integer at 3 digits (``maxDigits``, understood by
    outlines-core), so that generation cannot run away. Pydantic still validates the result.
    """
    schema = copy.deepcopy(Profile.model_json_schema())
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(copy.deepcopy(defs[node["$ref"].split("/")[-1]]))
            node = {k: inline(v) for k, v in node.items() if k not in ("title", "description")}
            if node.get("type") == "string" and "enum" not in node and max_chars is not None:
                node["maxLength"] = min(node.get("maxLength", max_chars), max_chars)
            if node.get("type") == "integer":
                node["maxDigits"] = 3
            return node
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    schema = inline(schema)
    props = schema["properties"]
    if categories:
        props["app_preferences"]["items"]["properties"]["category"] = {"type": "string", "enum": list(categories)}
    if areas:
        props["location_tendencies"]["items"]["properties"]["area"] = {"type": "string", "enum": list(areas)}
    props["temporal_regularities"]["properties"]["peak_hours"]["items"]["maxDigits"] = 2
    return schema
