"""The trace grammar of semantic-augmented synthesis (U-SCOPE section 5.2, Eq. 25): events as text.

This one module defines how a user's trace becomes text the trace LM learns, how that text is
parsed back (errors name their line), and the token-level constraint used at decode time, so
training data and constrained generation can never disagree.

Events are coarse so sequences stay short on a CPU: a user's records are aggregated into slots of
``slot_minutes`` (default 30) and each *active* slot becomes one line holding the dominant
(app category, location cluster) pair of the slot and a coarse traffic level::

    s17 Social_Networking c3 t2

- ``s17``: slot of day, zero-padded (``s00`` .. ``s47`` for 30-minute slots);
- ``Social_Networking``: app category (spaces become ``_``);
- ``c3``: location cluster of :mod:`scope.data.locations` (POI-cluster label of the base station);
- ``t2``: traffic level, how many records the slot holds, in :data:`LEVEL_BOUNDS` bins
  (``t0``: 1-2, ``t1``: 3-7, ``t2``: 8-19, ``t3``: 20 or more records).

A *window* is one calendar day of one user (the unit of one training example and of one
generated sequence). The weekday is constant within a window, so it is stated once in the window
header and in the conditioning prompt rather than repeated on every line. Within a window slots
strictly increase. The trace file format (training input, ``traces.txt``) is::

    # user 12 2016-04-20 Wed
    s00 Utilities c0 t0
    s15 News c0 t1
    <blank line>

Decode-time constraint (:class:`TraceLogitsProcessor`): each field's values are tokenized once
(:class:`GrammarTokens`) into a token trie; at every step only tokens that continue a *permitted*
value are allowed: a slot later than the previous line's, an app category that has at least one
permitted location cluster, a cluster whose (category, cluster) pair occurs in the user's
history, any level, then the newline; after a complete line also the end-of-sequence token. A
pair never seen in the user's history is permitted only while the user's exploration budget
lasts (:class:`TraceConstraint`). Optionally (``history_weight`` > 0) the LM's scores are
multiplied by the user's own history prior over slots, categories given the previous line's
category, and clusters given the category, ``p ~ p_LM * p_hist ** history_weight`` (a product of
experts, smoothed so every permitted value stays possible); the prior only moves probability among
the ways to go on, so the chance of ending the window (eos) stays the LM's. The trie walk costs a few
dictionary look-ups per sequence and step, far less than the LM forward pass
(``benchmarks/synthesis.py`` measures both throughputs).

Decision: ``outlines`` was measured and not kept for traces: compiling one user's regex took
~5.5 s, and a regex cannot express "slots increase" compactly; the trie processor needs no
compilation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

LEVEL_BOUNDS = (1, 3, 8, 20)            # lower bound of records in a slot for t0, t1, t2, t3
LEVEL_MAX_RECORDS = 40                  # records written back for a t3 line are drawn in [20, 40]
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
TRANSITION_BACKOFF = 2.0                # lines' worth of the user's category prior in each row of the transition prior
_HEADER = re.compile(r"^# user (\d+) (\d{4}-\d{2}-\d{2}) (Mon|Tue|Wed|Thu|Fri|Sat|Sun)$")


class TraceGrammarError(ValueError):
    """A line that does not follow the trace grammar (``source:line: message``)."""

    def __init__(self, source: str | Path | None, line: int | None, message: str):
        self.source, self.line, self.message = source, line, message
        where = f"{source or '<text>'}" + (f":{line}" if line is not None else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class TraceEvent:
    slot: int
    category: int
    cluster: int
    level: int


@dataclass
class TraceWindow:
    """One user-day: events in strictly increasing slots."""

    user_id: int
    date: str                      # yyyy-mm-dd
    events: list[TraceEvent] = field(default_factory=list)

    @property
    def weekday(self) -> str:
        return WEEKDAYS[pd.Timestamp(self.date).day_of_week]


def level_of(records: np.ndarray) -> np.ndarray:
    """Traffic level (0..3) of slots holding ``records`` records each."""
    return (np.searchsorted(np.asarray(LEVEL_BOUNDS), np.asarray(records), side="right") - 1).clip(0, len(LEVEL_BOUNDS) - 1)


def records_range(level: int) -> tuple[int, int]:
    """Inclusive range of records a line of this level stands for."""
    hi = LEVEL_BOUNDS[level + 1] - 1 if level + 1 < len(LEVEL_BOUNDS) else LEVEL_MAX_RECORDS
    return LEVEL_BOUNDS[level], hi


# --------------------------------------------------------------------------------------------
# The text grammar
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TraceGrammar:
    """Field vocabularies of one cohort: app category names, number of clusters, slot length."""

    categories: tuple[str, ...]
    n_clusters: int
    slot_minutes: int = 30

    def __post_init__(self):
        if 1440 % self.slot_minutes:
            raise ValueError(f"slot_minutes must divide a day (1440 minutes), got {self.slot_minutes}")
        if self.n_clusters < 1 or not self.categories:
            raise ValueError("a trace grammar needs at least one app category and one location cluster")
        tokens = [self.category_token(i) for i in range(len(self.categories))]
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"app category names collide once spaces become '_': {tokens}")

    @property
    def slots_per_day(self) -> int:
        return 1440 // self.slot_minutes

    # -- field spellings ---------------------------------------------------------------------
    def slot_token(self, slot: int) -> str:
        return f"s{slot:0{len(str(self.slots_per_day - 1))}d}"

    def category_token(self, category: int) -> str:
        return re.sub(r"\s+", "_", self.categories[category].strip())

    def cluster_token(self, cluster: int) -> str:
        return f"c{cluster:0{len(str(self.n_clusters - 1))}d}"

    @staticmethod
    def level_token(level: int) -> str:
        return f"t{level}"

    def field_values(self) -> list[list[str]]:
        """Spelling of every value of the four fields, in field order (the decode-time vocabulary)."""
        return [[self.slot_token(s) for s in range(self.slots_per_day)],
                [self.category_token(c) for c in range(len(self.categories))],
                [self.cluster_token(k) for k in range(self.n_clusters)],
                [self.level_token(v) for v in range(len(LEVEL_BOUNDS))]]

    def format_event(self, e: TraceEvent) -> str:
        return (f"{self.slot_token(e.slot)} {self.category_token(e.category)} {self.cluster_token(e.cluster)} "
                f"{self.level_token(e.level)}")

    def format_events(self, events: list[TraceEvent]) -> str:
        """The completion text of a window: one line per event, each ending with a newline."""
        return "".join(self.format_event(e) + "\n" for e in events)

    # -- parsing -----------------------------------------------------------------------------
    def parse_event(self, text: str, line: int | None = None, source=None) -> TraceEvent:
        parts = text.split(" ")
        if len(parts) != 4:
            raise TraceGrammarError(source, line, f"expected 4 space-separated fields `sNN Category cK tL`, "
                                                  f"found {len(parts)} in {text!r}")
        values = []
        for name, part, spellings in zip(("slot", "app category", "location cluster", "traffic level"),
                                          parts, self.field_values()):
            try:
                values.append(spellings.index(part))
            except ValueError:
                shown = ", ".join(spellings[:4]) + (", ..." if len(spellings) > 4 else "")
                raise TraceGrammarError(source, line, f"unknown {name} {part!r} (expected one of {shown})") from None
        return TraceEvent(*values)

    def parse_events(self, text: str, *, first_line: int = 1, source=None) -> list[TraceEvent]:
        """Lines of one window (strictly increasing slots); a trailing newline is allowed."""
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines = lines[:-1]
        events: list[TraceEvent] = []
        for offset, raw in enumerate(lines):
            event = self.parse_event(raw, first_line + offset, source)
            if events and event.slot <= events[-1].slot:
                raise TraceGrammarError(source, first_line + offset,
                                        f"slot {self.slot_token(event.slot)} does not follow "
                                        f"{self.slot_token(events[-1].slot)} (slots must strictly increase in a window)")
            events.append(event)
        return events

    def format_windows(self, windows: list[TraceWindow]) -> str:
        """The trace file: a header per window, its event lines, a blank line."""
        return "".join(f"# user {w.user_id} {w.date} {w.weekday}\n{self.format_events(w.events)}\n" for w in windows)

    def parse_windows(self, text: str, source=None) -> list[TraceWindow]:
        """Parse a trace file strictly; the first violation raises with its line number."""
        windows: list[TraceWindow] = []
        current: TraceWindow | None = None
        for line_no, raw in enumerate(text.split("\n"), 1):
            if raw == "":
                current = None
                continue
            if raw.startswith("#"):
                match = _HEADER.match(raw)
                if not match:
                    raise TraceGrammarError(source, line_no, f"expected a window header `# user <id> <yyyy-mm-dd> <Mon..Sun>`, "
                                                             f"found {raw!r}")
                current = TraceWindow(int(match.group(1)), match.group(2))
                if current.weekday != match.group(3):
                    raise TraceGrammarError(source, line_no, f"{current.date} is a {current.weekday}, not a {match.group(3)}")
                windows.append(current)
                continue
            if current is None:
                raise TraceGrammarError(source, line_no, "event line outside a window (a window starts with `# user ...`)")
            event = self.parse_event(raw, line_no, source)
            if current.events and event.slot <= current.events[-1].slot:
                raise TraceGrammarError(source, line_no, f"slot {self.slot_token(event.slot)} does not follow "
                                                         f"{self.slot_token(current.events[-1].slot)} (slots must strictly "
                                                         "increase in a window)")
            current.events.append(event)
        return windows

    def read_windows(self, path: str | Path) -> list[TraceWindow]:
        return self.parse_windows(Path(path).read_text(encoding="utf-8"), source=path)


# --------------------------------------------------------------------------------------------
# Events -> windows (the serialisation of a real cohort)
# --------------------------------------------------------------------------------------------

def slot_records(events: pd.DataFrame, cluster_of_location, grammar: TraceGrammar) -> pd.DataFrame:
    """Every record at a clustered station with its slot and its slot's dominant pair.

    Columns: ``user_id, date, slot, category, cluster`` of the record, then ``dominant_category``,
    ``dominant_cluster`` (the slot's most frequent (app category, location cluster) pair; ties: the
    pair seen first) and ``records`` (how many records the slot holds). Records at stations without
    a cluster are left out."""
    columns = ["user_id", "date", "slot", "category", "cluster", "dominant_category", "dominant_cluster", "records"]
    if not len(events):
        return pd.DataFrame(columns=columns)
    cluster = np.asarray(cluster_of_location(events["location_id"].to_numpy()), np.int64)
    t = pd.DatetimeIndex(events["timestamp"])
    frame = pd.DataFrame({
        "user_id": events["user_id"].to_numpy(np.int64), "date": t.normalize(),
        "slot": (t.hour * 60 + t.minute).to_numpy() // grammar.slot_minutes,
        "category": events["app_category"].to_numpy(np.int64), "cluster": cluster,
    })[cluster >= 0]
    keys = ["user_id", "date", "slot"]
    pairs = frame.groupby(keys + ["category", "cluster"], sort=False).size().rename("n").reset_index()
    pairs = pairs.sort_values(keys + ["n"], ascending=[True, True, True, False], kind="stable")
    dominant = pairs.drop_duplicates(keys, keep="first").set_index(keys)[["category", "cluster"]]
    dominant.columns = ["dominant_category", "dominant_cluster"]
    dominant["records"] = frame.groupby(keys).size().reindex(dominant.index)
    return frame.join(dominant, on=keys)[columns]


def windows_from_events(events: pd.DataFrame, cluster_of_location, grammar: TraceGrammar) -> list[TraceWindow]:
    """Aggregate validated events into user-day windows: one line per active slot, holding the slot's
    dominant (app category, location cluster) pair and the level of its record count
    (:func:`slot_records`)."""
    slots = slot_records(events, cluster_of_location, grammar).drop_duplicates(["user_id", "date", "slot"])
    slots = slots.sort_values(["user_id", "date", "slot"], kind="stable")
    slots = slots.assign(level=level_of(slots["records"].to_numpy(np.int64)))
    windows = []
    for (user, date), g in slots.groupby(["user_id", "date"], sort=True):
        evs = [TraceEvent(int(s), int(c), int(k), int(v)) for s, c, k, v in
               zip(g["slot"], g["dominant_category"], g["dominant_cluster"], g["level"])]
        windows.append(TraceWindow(int(user), date.strftime("%Y-%m-%d"), evs))
    return windows


def history_pairs(events: pd.DataFrame, cluster_of_location, n_categories: int, n_clusters: int) -> np.ndarray:
    """``[A, K]`` bool: the (app category, location cluster) pairs that co-occur in these events."""
    pairs = np.zeros((n_categories, n_clusters), bool)
    if len(events):
        cluster = np.asarray(cluster_of_location(events["location_id"].to_numpy()), np.int64)
        known = cluster >= 0
        pairs[events["app_category"].to_numpy(np.int64)[known], cluster[known]] = True
    return pairs


# --------------------------------------------------------------------------------------------
# Tokens: the grammar as token sequences, and the decode-time constraint
# --------------------------------------------------------------------------------------------

class _Node:
    __slots__ = ("children", "value", "reach", "values")

    def __init__(self):
        self.children: dict[int, _Node] = {}
        self.value: int | None = None
        self.reach = 0          # bitmask of the values whose token sequence passes through this node
        self.values: list[int] = []   # the same values, as a list


def _trie(sequences: list[list[int]]) -> _Node:
    root = _Node()
    for value, seq in enumerate(sequences):
        node = root
        node.reach |= 1 << value
        node.values.append(value)
        for token in seq:
            node = node.children.setdefault(token, _Node())
            node.reach |= 1 << value
            node.values.append(value)
        node.value = value
    return root


class GrammarTokens:
    """The grammar's field values as token-id sequences of one tokenizer, and their tries.

    Training examples are built from these sequences (:meth:`encode_events`) and decoding walks
    the same tries, so the trace LM sees exactly the tokens it is later constrained to. A field
    whose values are not prefix-free at the token level (one value's tokens a strict prefix of
    another's) would make the end of a value ambiguous: refused at construction.
    """

    def __init__(self, grammar: TraceGrammar, tokenizer):
        self.grammar, self.tokenizer = grammar, tokenizer
        encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
        values = grammar.field_values()
        # the first field follows a newline (or the prompt's last newline); the others a space
        self.fields = [[encode(v) for v in values[0]]] + [[encode(" " + v) for v in vs] for vs in values[1:]]
        self.newline = encode("\n")
        eos = tokenizer.eos_token_id
        self.eos = eos
        if eos is None:
            raise ValueError("the tokenizer has no eos token: the trace LM needs one to end a window")
        for name, spellings, seqs in zip(("slot", "category", "cluster", "level"), values, self.fields):
            for i, a in enumerate(seqs):
                if not a:
                    raise ValueError(f"{name} value {spellings[i]!r} tokenizes to nothing")
                for j, b in enumerate(seqs):
                    if i != j and len(a) < len(b) and b[:len(a)] == a:
                        raise ValueError(f"{name} values are not prefix-free for this tokenizer: {a} / {b}")
        self.tries = [_trie(seqs) for seqs in self.fields] + [_trie([self.newline])]

    def encode_events(self, events: list[TraceEvent]) -> list[int]:
        ids: list[int] = []
        for e in events:
            for f, v in enumerate((e.slot, e.category, e.cluster, e.level)):
                ids += self.fields[f][v]
            ids += self.newline
        return ids


@dataclass
class TraceConstraint:
    """What one generated window may contain.

    ``pairs[a, k]``: (app category a, location cluster k) occurs in the user's history. A pair
    outside it may be generated at most ``exploration_budget`` times per window (0: never).
    """

    pairs: np.ndarray
    exploration_budget: int = 0
    # optional history priors (counts, smoothed here): over slots [S], categories [A], pairs [A, K], and
    # category transitions [A, A] (row: the previous line's category, column: the next line's)
    slot_counts: np.ndarray | None = None
    category_counts: np.ndarray | None = None
    pair_counts: np.ndarray | None = None
    transition_counts: np.ndarray | None = None

    def __post_init__(self):
        self.pairs = np.asarray(self.pairs, bool)
        smooth = lambda c: None if c is None else (np.asarray(c, np.float64) + 0.5) / (np.asarray(c, np.float64) + 0.5).sum(-1, keepdims=True)
        self.slot_prior, self.category_prior, self.pair_prior = map(smooth, (self.slot_counts, self.category_counts,
                                                                             self.pair_counts))
        self.transition_prior = None
        if self.transition_counts is not None:   # backed off to the category prior, worth TRANSITION_BACKOFF lines
            n = np.asarray(self.transition_counts, np.float64)
            base = self.category_prior if self.category_prior is not None else np.full(n.shape[1], 1 / n.shape[1])
            self.transition_prior = (n + TRANSITION_BACKOFF * base) / (n.sum(1, keepdims=True) + TRANSITION_BACKOFF)
        if not self.pairs.any() and self.exploration_budget <= 0:
            raise ValueError("the constraint allows no (app category, location cluster) pair and no exploration: "
                             "nothing can be generated")


class _State:
    """Where one sequence is in the grammar."""

    __slots__ = ("constraint", "field", "node", "line", "last_slot", "last_category", "budget", "events", "done")

    def __init__(self, constraint: TraceConstraint):
        self.constraint = constraint
        self.field, self.node, self.line = 0, None, []
        self.last_slot, self.last_category = -1, -1
        self.budget, self.events, self.done = constraint.exploration_budget, 0, False


class TraceLogitsProcessor:
    """A ``transformers`` logits processor that keeps every sequence of a batch inside the grammar
    and its user's :class:`TraceConstraint`; it also applies the sampling temperature (after the
    mask, so no warper can remove every permitted token)."""

    def __init__(self, tokens: GrammarTokens, constraints: list[TraceConstraint], temperature: float = 1.0,
                 history_weight: float = 0.0):
        self.tokens, self.temperature = tokens, max(float(temperature), 1e-5)
        self.history_weight = float(history_weight)
        self.states = [_State(c) for c in constraints]
        self.prompt_len: int | None = None
        self.n_slots = tokens.grammar.slots_per_day

    # values of the current field this state may still take (bitmask over the field's values)
    def _permitted(self, s: _State) -> int:
        pairs, explore = s.constraint.pairs, s.budget > 0
        if s.field == 0:
            return sum(1 << v for v in range(s.last_slot + 1, self.n_slots))
        if s.field == 1:
            ok = np.ones(len(pairs), bool) if explore else pairs.any(1)
            return sum(1 << int(a) for a in np.flatnonzero(ok))
        if s.field == 2:
            row = np.ones(pairs.shape[1], bool) if explore else pairs[s.line[1]]
            return sum(1 << int(k) for k in np.flatnonzero(row))
        return (1 << len(self.tokens.fields[s.field])) - 1 if s.field == 3 else 1

    def allowed(self, s: _State) -> list[int]:
        if s.done:
            return [self.tokens.eos]
        node = s.node or self.tokens.tries[s.field]
        mask = self._permitted(s)
        out = [t for t, child in node.children.items() if child.reach & mask]
        if s.field == 0 and s.node is None and s.events > 0:
            out.append(self.tokens.eos)
        return out

    def _prior(self, s: _State) -> np.ndarray | None:
        c = s.constraint
        if s.field == 0:
            return c.slot_prior
        if s.field == 1:
            return c.transition_prior[s.last_category] if c.transition_prior is not None and s.last_category >= 0 \
                else c.category_prior
        if s.field == 2 and c.pair_prior is not None:
            return c.pair_prior[s.line[1]]
        return None

    def log_prior(self, s: _State, allowed: list[int]) -> np.ndarray | None:
        """``log`` of the history prior mass of the permitted values behind each allowed token
        (a product of experts with the LM: ``p ~ p_LM * p_hist ** history_weight``); ``0`` for eos,
        whose probability :meth:`__call__` keeps at the LM's own."""
        prior = self._prior(s) if self.history_weight and not s.done else None
        if prior is None:
            return None
        node = s.node or self.tokens.tries[s.field]
        mask = self._permitted(s)
        out = np.zeros(len(allowed))
        for i, t in enumerate(allowed):
            child = node.children.get(t)
            if child is not None:
                out[i] = np.log(sum(prior[v] for v in child.values if mask >> v & 1) + 1e-12)
        return out

    def advance(self, s: _State, token: int) -> None:
        if s.done:
            return
        if token == self.tokens.eos and s.field == 0 and s.node is None:
            s.done = True
            return
        node = (s.node or self.tokens.tries[s.field]).children.get(token)
        if node is None:   # cannot happen when this processor masked the step
            raise RuntimeError(f"token {token} leaves the trace grammar")
        if node.children:
            s.node = node
            return
        s.node = None
        if s.field < 4:
            s.line.append(node.value)
            s.field += 1
            if s.field == 3:   # category and cluster are known: spend budget on an unseen pair
                if not s.constraint.pairs[s.line[1], s.line[2]]:
                    s.budget -= 1
            return
        s.last_slot, s.last_category, s.events, s.field, s.line = s.line[0], s.line[1], s.events + 1, 0, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        elif input_ids.shape[1] > self.prompt_len:
            for s, token in zip(self.states, input_ids[:, -1].tolist()):
                self.advance(s, token)
        mask = torch.ones_like(scores, dtype=torch.bool)
        bias = torch.zeros_like(scores) if self.history_weight else None
        for row, s in enumerate(self.states):
            allowed = self.allowed(s)
            mask[row, allowed] = False
            log_prior = self.log_prior(s, allowed) if bias is not None else None
            if log_prior is None:
                continue
            ids = torch.as_tensor(allowed)
            b = torch.as_tensor(self.history_weight * log_prior, dtype=scores.dtype)
            go_on = ids != self.tokens.eos
            if not go_on.all():   # renormalise the continuations: the prior moves mass among them, never to eos
                lm = scores[row, ids[go_on]]
                b[go_on] -= torch.logsumexp(lm + b[go_on], 0) - torch.logsumexp(lm, 0)
            bias[row, ids] = b
        scores = scores + bias if bias is not None else scores
        return (scores / self.temperature).masked_fill(mask, float("-inf"))
