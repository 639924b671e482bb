"""Teachers: structured prompt -> chain-of-thought + profile (U-SCOPE section 5.1), behind one
interface, with an on-disk cache.

- :class:`GroundedTeacher` (the default): deterministic, offline, writes the reasoning and the
  profile from the statistics themselves (so its profile is consistent with ``H_u`` by
  construction: the ``y_w`` of Eq. 27).
- :class:`LocalTeacher`: any local causal LM through transformers; decoding is constrained to the
  profile schema with ``outlines`` (:func:`scope.profiles.schema.generation_schema`).
- :class:`EndpointTeacher`: any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, TGI,
  llama.cpp server, Ollama, ``recipes/serve.py``): asks for JSON-schema output, validates it,
  runs ``concurrency`` requests at a time, each attempt under a wall-clock deadline, and retries
  invalid output, broken connections, time-outs, 429 and 5xx (honouring ``Retry-After``) a
  bounded number of times; other 4xx are not retried. A user whose output never validates is
  *reported* (``TeacherResult.error``), never silently dropped, and ``generate`` never raises
  for a fault of the endpoint.

:func:`run_teacher` puts a :class:`TeacherCache` in front of any teacher: entries are keyed by
``sha256(teacher identity + prompt text)``, so reruns never pay twice; each result is written to
the cache (one atomic file per entry) as soon as it arrives, so a run killed mid-way loses at most
the requests in flight. Each entry stores a checksum of its content, and an entry that is
unreadable, fails its checksum or no longer validates is reported as corrupted, deleted and
regenerated.

Decisions: the grounded teacher's persona matches the simulator's ground truth for 97% of a
200-user cohort, and its profile is the ``y_w`` of Eq. 27. A user whose output never validates is
written to ``<output_dir>/teacher_failures.jsonl``; the run stops when more than
``max_teacher_failure_fraction`` of the users fail.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from scope.data.statistics import UserStatistics
from scope.data.tsinghua import category_key
from scope.io import write_text
from scope.profiles.constrained import ChatGenerator
from scope.profiles.prompts import UserPrompt
from scope.profiles.schema import (AppPreference, LocationTendency, Profile, ProfileError, TemporalRegularities,
                                   generation_schema, parse_profile, profile_json_schema)

log = logging.getLogger(__name__)

RETRY_AFTER_CAP_S = 120.0   # the longest ``Retry-After`` honoured
PROGRESS_MIN_USERS = 32     # run_teacher shows a progress bar from this many uncached users


@dataclass
class TeacherResult:
    user_id: int
    profile: Profile | None
    raw: str = ""
    error: str | None = None      # why no valid profile came back (after all retries)
    attempts: int = 1
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.profile is not None


class Teacher:
    """One interface: ``generate(prompts) -> results`` in the same order; ``name`` keys the cache."""

    name: str = "teacher"

    def generate(self, prompts: Sequence[UserPrompt]) -> list[TeacherResult]:
        raise NotImplementedError

    def stream(self, prompts: Sequence[UserPrompt]) -> Iterator[tuple[int, TeacherResult]]:
        """``(index into prompts, result)`` pairs as results become available (any order); by default
        one prompt at a time."""
        for i, p in enumerate(prompts):
            yield i, self.generate([p])[0]


# --------------------------------------------------------------------------------------------
# (a) The grounded teacher
# --------------------------------------------------------------------------------------------

INTENT_OF_APP = {category_key(name): intent for name, intent in {
    "Utilities": "use phone tools", "Games": "play games", "Entertainment": "watch videos", "News": "read news",
    "Social Networking": "chat with friends", "Shopping": "shop online", "Finance": "manage money",
    "Business": "do work tasks", "Travel": "plan trips", "Lifestyle": "find local services", "Education": "study",
    "Health & Fitness": "track fitness", "Infant & Mom": "care for a child", "Navigation": "navigate",
    "Weather": "check the weather", "Music": "listen to music", "References": "look things up", "Books": "read books",
    "Photo & Video": "share photos", "Sports": "follow sports",
}.items()}  # keyed by scope.data.tsinghua.category_key, so the real file's spellings match too


def intent_of(app: str, area: str) -> str:
    """The intent label of a record: the activity of its app category at the kind of place of its
    POI-cluster area (the first name of the area, lower case), e.g. ``watch videos at residential``."""
    return f"{INTENT_OF_APP.get(category_key(app), 'use ' + app + ' apps')} at {area.split(' / ')[0].lower()}"


def _share(stats: UserStatistics, names: tuple[str, ...]) -> float:
    keys = {category_key(n) for n in names}
    return sum(v for c, v in stats.app_share.items() if category_key(c) in keys)


@dataclass(frozen=True)
class PersonaRule:
    """One persona of the grounded teacher: ``label`` when ``applies(stats)``, with the evidence
    ``because(stats)`` written into the reasoning."""

    label: str
    applies: Callable[[UserStatistics], bool]
    because: Callable[[UserStatistics], str]


def _top_area(s: UserStatistics) -> str:
    return s.places[0].area if s.places else ""


# The persona vocabulary, in one place: the first rule that applies names the user, else
# FALLBACK_PERSONA. App categories are matched by letters (category_key), POI areas by substring.
# Pass other rules to GroundedTeacher(persona_rules=...) for another vocabulary.
PERSONA_RULES: tuple[PersonaRule, ...] = (
    PersonaRule("night-shift worker", lambda s: s.day_part_share["night"] > 0.22,
                lambda s: f"{s.day_part_share['night']:.0%} of activity is at night"),
    PersonaRule("traveller",
                lambda s: _share(s, ("Navigation", "Travel")) > 0.18 or (
                    "Transportation" in " ".join(s.top_areas(3))
                    and _share(s, ("Navigation", "Travel", "Photo & Video")) > 0.2),
                lambda s: f"navigation and travel apps take {_share(s, ('Navigation', 'Travel')):.0%}"),
    PersonaRule("student", lambda s: _share(s, ("Education", "Games")) > 0.2 or "Education" in _top_area(s),
                lambda s: f"education and games apps take {_share(s, ('Education', 'Games')):.0%}"),
    PersonaRule("retiree",
                lambda s: _share(s, ("News", "Health & Fitness", "Weather", "Books")) > 0.25
                and s.day_part_share["evening"] < 0.35,
                lambda s: "news, health and weather apps take "
                          f"{_share(s, ('News', 'Health & Fitness', 'Weather', 'Books')):.0%}"),
    PersonaRule("commuter", lambda s: _share(s, ("Business", "Finance")) > 0.1,
                lambda s: f"business and finance apps take {_share(s, ('Business', 'Finance')):.0%}"),
)
FALLBACK_PERSONA = PersonaRule(
    "homebody", lambda s: True,
    lambda s: f"{s.places[0].share:.0%} of records are at one place" if s.places else "activity stays local")


def infer_persona(s: UserStatistics, rules: Sequence[PersonaRule] = PERSONA_RULES) -> tuple[str, str]:
    """A persona label and the evidence for it: the first of ``rules`` that applies."""
    if s.empty:
        return "unknown (no history)", "there is no usage history"
    rule = next((r for r in rules if r.applies(s)), FALLBACK_PERSONA)
    return rule.label, rule.because(s)


def _role(place, home_rank: int | None) -> str:
    if place.rank == home_rank:
        return "home"
    if "Transportation" in place.area:
        return "transit"
    daytime = place.day_parts["morning"] + place.day_parts["afternoon"]
    if place.weekday_share > 0.8 and daytime > 0.6:
        return "work"
    if "leisure" in place.area.lower() or "Scenic" in place.area or place.day_parts["evening"] > 0.5:
        return "leisure"
    return "other"


def grounded_profile(s: UserStatistics, persona_rules: Sequence[PersonaRule] = PERSONA_RULES) -> Profile:
    """The deterministic profile of one user's statistics (reasoning + profile)."""
    persona, why = infer_persona(s, persona_rules)
    if s.empty:
        return Profile(reasoning="No app-usage records were observed, so nothing can be inferred about this user.",
                       persona=persona, app_preferences=[], location_tendencies=[],
                       temporal_regularities=TemporalRegularities(peak_hours=[], most_active_period="unknown",
                                                                  week_pattern="unknown", sessions_per_day=0,
                                                                  regularity="unknown"),
                       likely_intents=[])
    parts = s.day_part_share
    period = max(parts, key=parts.get)
    if s.weekday_rate == 0 or s.weekend_rate == 0:
        week = "unknown"
    else:
        ratio = s.weekend_rate / s.weekday_rate
        week = "more on weekends" if ratio > 1.15 else "more on weekdays" if ratio < 0.87 else "similar"
    regularity = "high" if s.regularity > 0.2 else "medium" if s.regularity > 0.1 else "low"
    night_share = [p.day_parts["night"] * p.share for p in s.places]
    home_rank = s.places[int(np.argmax(night_share))].rank if s.places and max(night_share) > 0 else None
    places = [LocationTendency(place=f"place {p.rank}", area=p.area, role=_role(p, home_rank),
                               share_pct=round(100 * p.share)) for p in s.places]
    apps = [AppPreference(category=c, share_pct=round(100 * v)) for c, v in list(s.app_share.items())[:4]]
    intents = []
    for area, app, _ in s.top_pairs(6):
        intent = intent_of(app, area)
        if intent not in intents:
            intents.append(intent)
    top = list(s.app_share.items())[:2]
    caution = f" Only {s.n_events} records were observed, so this is tentative." if s.tiny else ""
    reasoning = (f"{top[0][0]} dominates app use ({top[0][1]:.0%})"
                 + (f", followed by {top[1][0]} ({top[1][1]:.0%})" if len(top) > 1 else "")
                 + f". Activity peaks in the {period} ({parts[period]:.0%}) with {s.sessions_per_day:.0f} sessions per active day"
                 + (f", and place 1 is a {s.places[0].area} area ({s.places[0].share:.0%} of records)" if s.places else "")
                 + f". The persona is {persona} because {why}.{caution}")
    return Profile(reasoning=reasoning, persona=persona, app_preferences=apps, location_tendencies=places,
                   temporal_regularities=TemporalRegularities(peak_hours=s.peak_hours(3), most_active_period=period,
                                                              week_pattern=week, sessions_per_day=round(s.sessions_per_day),
                                                              regularity=regularity),
                   likely_intents=intents[:3])


class GroundedTeacher(Teacher):
    """Deterministic teacher computed from the statistics: offline, always available. Other
    ``persona_rules`` give another persona vocabulary (and, through ``name``, another cache)."""

    name = "grounded-v2"
    persona_rules: tuple[PersonaRule, ...] = PERSONA_RULES

    def __init__(self, persona_rules: Sequence[PersonaRule] | None = None, name: str | None = None):
        if persona_rules is not None:
            if name is None:
                raise ValueError("custom persona_rules need their own teacher name (the cache key)")
            self.persona_rules, self.name = tuple(persona_rules), name

    def generate(self, prompts: Sequence[UserPrompt]) -> list[TeacherResult]:
        out = []
        for p in prompts:
            profile = grounded_profile(p.stats, self.persona_rules)
            out.append(TeacherResult(p.user_id, profile, profile.to_json()))
        return out


# --------------------------------------------------------------------------------------------
# (b) A local transformers model, constrained by outlines
# --------------------------------------------------------------------------------------------

class LocalTeacher(Teacher):
    """Any local causal LM; decoding is constrained to the profile schema with ``outlines``.

    ``categories`` / ``areas`` turn those fields into enums of the cohort's names;
    ``max_chars`` caps every free string so that a generation always terminates.
    """

    def __init__(self, model, tokenizer, *, model_name: str = "local", max_new_tokens: int = 512,
                 categories: list[str] | None = None, areas: list[str] | None = None, max_chars: int = 300):
        self.chat = ChatGenerator(model, tokenizer)
        self.max_new_tokens = max_new_tokens
        self.schema = generation_schema(categories, areas, max_chars)
        schema_sha = hashlib.sha256(json.dumps(self.schema, sort_keys=True).encode()).hexdigest()[:12]
        self.name = f"local:{model_name}:{schema_sha}:{max_new_tokens}"
        self.chat.constrained(self.schema)  # compile the schema now, not at the first user

    def generate(self, prompts: Sequence[UserPrompt]) -> list[TeacherResult]:
        out = []
        for p in prompts:
            raw = self.chat.generate(p.messages, self.max_new_tokens, self.schema).text
            try:
                out.append(TeacherResult(p.user_id, parse_profile(raw), raw))
            except ProfileError as err:  # e.g. cut by max_new_tokens
                out.append(TeacherResult(p.user_id, None, raw, f"{err} (raise max_new_tokens?)"))
        return out


# --------------------------------------------------------------------------------------------
# (c) Any OpenAI-compatible endpoint
# --------------------------------------------------------------------------------------------

class EndpointStatusError(Exception):
    """A non-2xx reply. 429 and 5xx are worth retrying (after ``retry_after`` seconds when the server
    says so); any other status (400, 401, 403, 404, ...) will not change on a retry."""

    def __init__(self, status: int, reason: str, body: bytes, retry_after: str | None):
        super().__init__(f"HTTP {status} {reason}: {body[:200].decode(errors='replace')}")
        self.status, self.retry_after = status, _retry_after_s(retry_after)

    @property
    def retryable(self) -> bool:
        return self.status == 429 or self.status >= 500


def _retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), capped at
    :data:`RETRY_AFTER_CAP_S`; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (email.utils.parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


def _transport_error(err: Exception) -> str:
    if isinstance(err, TimeoutError):  # socket.timeout is TimeoutError
        return f"endpoint timed out: {err}"
    if isinstance(err, (json.JSONDecodeError, UnicodeDecodeError)):
        return f"reply is not JSON: {err}"
    if isinstance(err, (http.client.HTTPException, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return f"connection lost: {err!r}"  # IncompleteRead, BadStatusLine, RemoteDisconnected, ...
    return f"endpoint unreachable: {err}"


def _cut(sock: socket.socket) -> None:
    """Shut a socket down from another thread: a ``recv`` blocked on it returns at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class EndpointTeacher(Teacher):
    """An OpenAI-compatible chat endpoint with bounded concurrency, deadlines and bounded retries.

    ``timeout_s`` bounds each attempt as a whole (connect, send, headers and body; the back-off
    between attempts is extra). The socket time-out bounds the connect and every single read; once
    connected, a watchdog timer shuts the socket down at the deadline, which wakes the blocked
    read, so a server that trickles bytes cannot stretch an attempt (a per-read time-out alone never
    fires while bytes keep coming, and abandoning a thread would leave the socket open).
    Broken connections, time-outs, non-JSON replies, invalid output, 429 and 5xx are retried
    ``max_retries`` times, waiting ``Retry-After`` when the server sends one and an exponential
    back-off otherwise; other statuses fail the user at once with the status and message.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, concurrency: int = 4,
                 timeout_s: float = 120.0, max_retries: int = 2, backoff_s: float = 0.5, max_tokens: int = 768,
                 temperature: float = 0.0, schema: dict | None = None):
        self.base_url, self.model = base_url.rstrip("/"), model
        url = urllib.parse.urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"teacher endpoint {base_url!r} is not an http(s) URL")
        self._connection = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        self._host, self._port, self._path = url.hostname, url.port, f"{url.path}/chat/completions"
        self.api_key, self.concurrency, self.timeout_s = api_key, max(1, concurrency), timeout_s
        self.max_retries, self.backoff_s = max(0, max_retries), backoff_s
        self.max_tokens, self.temperature = max_tokens, temperature
        self.schema = schema or profile_json_schema()
        self.name = f"endpoint:{self.base_url}:{model}:{temperature}"

    def _request(self, messages: list[dict]) -> str:
        """One attempt: the reply's content, or an exception (see :meth:`_one`)."""
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature,
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "profile", "schema": self.schema, "strict": True}}}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        deadline, late = time.monotonic() + self.timeout_s, f"no complete reply within {self.timeout_s:g} s"
        conn = self._connection(self._host, self._port, timeout=self.timeout_s)
        watchdog = None
        try:
            conn.connect()
            watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _cut, (conn.sock,))
            watchdog.daemon = True
            watchdog.start()
            conn.request("POST", self._path, json.dumps(body).encode(), headers)
            response = conn.getresponse()
            payload = response.read()
        except (http.client.HTTPException, OSError) as err:
            if time.monotonic() >= deadline:
                raise TimeoutError(late) from err
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
            conn.close()
        if time.monotonic() >= deadline:  # the watchdog may have cut the headers or a body without length short
            raise TimeoutError(late)
        if not 200 <= response.status < 300:
            raise EndpointStatusError(response.status, response.reason, payload, response.getheader("Retry-After"))
        reply = json.loads(payload)
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ProfileError(f"not a chat-completion reply: {str(reply)[:200]}") from None

    def _one(self, prompt: UserPrompt, stop: threading.Event) -> TeacherResult:
        """One user, retried; always a result. ``stop`` ends the waits between attempts early."""
        errors, raw = [], ""
        for attempt in range(1, self.max_retries + 2):
            wait = self.backoff_s * 2 ** (attempt - 1)
            try:
                raw = self._request(prompt.messages)
                return TeacherResult(prompt.user_id, parse_profile(raw), raw, attempts=attempt)
            except ProfileError as err:
                errors.append(f"attempt {attempt}: invalid output: {err}")
            except EndpointStatusError as err:
                errors.append(f"attempt {attempt}: {err}")
                if not err.retryable:
                    break
                wait = wait if err.retry_after is None else err.retry_after
            except (http.client.HTTPException, OSError, ValueError) as err:
                errors.append(f"attempt {attempt}: {_transport_error(err)}")
            if attempt > self.max_retries or stop.wait(wait):
                break
        return TeacherResult(prompt.user_id, None, raw, "; ".join(errors), attempts=len(errors))

    def stream(self, prompts: Sequence[UserPrompt]) -> Iterator[tuple[int, TeacherResult]]:
        """Results in completion order, ``concurrency`` requests at a time. Closing the iterator
        (an error or Ctrl-C in the consumer) cancels the queued users and the pending retries."""
        stop = threading.Event()
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="teacher")
        try:
            futures = {pool.submit(self._one, p, stop): i for i, p in enumerate(prompts)}
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)

    def generate(self, prompts: Sequence[UserPrompt]) -> list[TeacherResult]:
        done = dict(self.stream(prompts))
        return [done[i] for i in range(len(prompts))]

    def request_body(self, messages: list[dict]) -> dict:
        """The JSON body :meth:`_request` POSTs for ``messages`` (model, max_tokens, temperature and
        the schema as ``response_format``): what :func:`batch_request` puts in a batch line."""
        return {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature,
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "profile", "schema": self.schema, "strict": True}}}


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------

@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupted: list[str] = field(default_factory=list)


class TeacherCache:
    """On-disk cache of valid teacher outputs: ``<dir>/<key[:2]>/<key>.json``, written atomically."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.stats = CacheStats()

    @staticmethod
    def key(teacher_name: str, prompt: UserPrompt) -> str:
        return hashlib.sha256(f"{teacher_name}\n\x00{prompt.text}".encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    @staticmethod
    def _checksum(raw: str, profile: dict) -> str:
        return hashlib.sha256((raw + "\x00" + json.dumps(profile, sort_keys=True)).encode()).hexdigest()

    def get(self, key: str) -> tuple[Profile, str] | None:
        path = self.path(key)
        if not path.exists():
            self.stats.misses += 1
            return None
        try:
            entry = json.loads(path.read_text())
            if entry["key"] != key or entry["checksum"] != self._checksum(entry["raw"], entry["profile"]):
                raise ValueError("key or checksum mismatch")
            profile = Profile.model_validate(entry["profile"])
        except Exception as err:  # unreadable, truncated, tampered or no longer valid: regenerate
            log.warning("teacher cache entry %s is corrupted (%s): regenerating it", path, err)
            self.stats.corrupted.append(str(path))
            path.unlink(missing_ok=True)
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return profile, entry["raw"]

    def put(self, key: str, teacher_name: str, result: TeacherResult) -> None:
        profile = result.profile.model_dump(mode="json")
        entry = {"key": key, "teacher": teacher_name, "profile": profile, "raw": result.raw,
                 "checksum": self._checksum(result.raw, profile)}
        write_text(self.path(key), json.dumps(entry, ensure_ascii=False))


def run_teacher(teacher: Teacher, prompts: Sequence[UserPrompt], cache: TeacherCache | None = None) -> list[TeacherResult]:
    """Teacher outputs for ``prompts`` (same order); cached ones are read, the rest generated.

    Each valid result is cached the moment it arrives (:meth:`Teacher.stream`), so a rerun after a
    crash or kill pays only for what was not done. Failed users come back with ``profile=None`` and
    ``error`` set; the caller reports them. A progress bar (users/s) shows from
    :data:`PROGRESS_MIN_USERS` uncached users.
    """
    results: list[TeacherResult | None] = [None] * len(prompts)
    todo = []
    for i, p in enumerate(prompts):
        hit = cache.get(TeacherCache.key(teacher.name, p)) if cache else None
        if hit:
            results[i] = TeacherResult(p.user_id, hit[0], hit[1], cached=True)
        else:
            todo.append(i)
    with (closing(teacher.stream([prompts[i] for i in todo])) as stream,  # an error or Ctrl-C cancels what is queued
          tqdm(total=len(todo), desc=f"teacher {teacher.name}", unit="user", disable=len(todo) < PROGRESS_MIN_USERS) as bar):
        for j, r in stream:
            results[todo[j]] = r
            if cache and r.ok:
                cache.put(TeacherCache.key(teacher.name, prompts[todo[j]]), teacher.name, r)
            bar.update()
    failed = [r for r in results if not r.ok]
    if failed:
        log.warning("teacher %s failed for %d of %d users (first: user %d: %s)", teacher.name, len(failed),
                    len(prompts), failed[0].user_id, failed[0].error)
    return results


BATCH_URL = "/v1/chat/completions"   # the ``url`` of every OpenAI Batch request line


def batch_request(teacher: EndpointTeacher, prompt: UserPrompt, key: str | None = None) -> dict:
    """One line of an OpenAI Batch API input file (``vllm run-batch`` reads the same format): the
    request ``teacher`` would POST for ``prompt``, under ``custom_id`` = its cache key
    (:meth:`TeacherCache.key` of the teacher's name and the prompt), so that an answer stored under
    that id is what :func:`run_teacher` finds for the same teacher and prompt."""
    return {"custom_id": key or TeacherCache.key(teacher.name, prompt), "method": "POST", "url": BATCH_URL,
            "body": teacher.request_body(prompt.messages)}
