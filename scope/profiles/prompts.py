"""Structured prompts ``x_u`` (U-SCOPE section 5.1, Eq. 23): statistics rendered through the Jinja2
templates in ``prompts/`` (text files, not Python strings).

A prompt is a chat: the system message (``prompts/profile_system.jinja``) states the task and the
answer format; the user message (``prompts/profile_user.jinja``) holds the user's ``pi_time``,
``C_u`` and ``sigma_u`` (section 5.1). Places are "place 1..3" with their POI-cluster area; no user
id or base-station id is ever rendered (a test checks it). An empty history gets a valid prompt
that says there is no data; a tiny one (< ``scope.data.statistics.TINY_HISTORY`` records) says the
statistics are unreliable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2

from scope.data.statistics import UserStatistics

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"
SYSTEM_TEMPLATE = "profile_system.jinja"
USER_TEMPLATE = "profile_user.jinja"
RECOMMEND_SYSTEM_TEMPLATE = "recommend_system.jinja"
RECOMMEND_USER_TEMPLATE = "recommend_user.jinja"


@dataclass(frozen=True)
class UserPrompt:
    """One user's structured prompt and the statistics it was rendered from."""

    user_id: int
    system: str
    user: str
    stats: UserStatistics

    @property
    def messages(self) -> list[dict]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]

    @property
    def text(self) -> str:
        """The exact prompt text (the teacher-cache key covers it)."""
        return f"{self.system}\n\n{self.user}"


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


class PromptBuilder:
    """Renders prompts from a template folder (default: the project's ``prompts/``)."""

    def __init__(self, template_dir: str | Path = PROMPTS_DIR):
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir)), undefined=jinja2.StrictUndefined,
                                      keep_trailing_newline=False, autoescape=False)
        self.env.filters["pct"] = _pct
        self.system = self.env.get_template(SYSTEM_TEMPLATE).render().strip()
        self.user_template = self.env.get_template(USER_TEMPLATE)
        self.recommend_system = self.env.get_template(RECOMMEND_SYSTEM_TEMPLATE).render().strip()
        self.recommend_template = self.env.get_template(RECOMMEND_USER_TEMPLATE)

    def __call__(self, stats: UserStatistics) -> UserPrompt:
        return UserPrompt(stats.user_id, self.system, self.user_template.render(s=stats).strip(), stats)

    def recommendation(self, stats: UserStatistics, seen: dict[str, list[str]], candidates: dict[str, list[str]]) -> UserPrompt:
        """The novelty-recommendation turn (:mod:`scope.profiles.novelty`): the visible history's
        statistics, the items already used and the ranked candidates per item type."""
        by_kind: dict[str, list[str]] = {}
        for intent in seen["intents"]:
            activity, kind = intent.split(" at ", 1)
            by_kind.setdefault(kind, []).append(activity)
        text = self.recommend_template.render(s=stats, seen=seen, seen_intents=sorted(by_kind.items()),
                                              candidates=candidates).strip()
        return UserPrompt(stats.user_id, self.recommend_system, text, stats)
