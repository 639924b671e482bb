"""The trace grammar (scope.synthesis.traces): one spelling for training text and decoding, strict parsing
with line numbers, and a decode-time constraint that cannot be escaped."""

import numpy as np
import pandas as pd
import pytest
import torch

from scope.data.simulate import APP_CATEGORIES
from scope.synthesis.traces import (GrammarTokens, TraceConstraint, TraceEvent, TraceGrammar, TraceGrammarError,
                                    TraceLogitsProcessor, TraceWindow, history_pairs, level_of, records_range,
                                    windows_from_events)

GRAMMAR = TraceGrammar(APP_CATEGORIES, 6, 30)


def test_event_spelling_and_round_trip():
    e = TraceEvent(slot=7, category=APP_CATEGORIES.index("Social Networking"), cluster=3, level=2)
    assert GRAMMAR.format_event(e) == "s07 Social_Networking c3 t2"
    assert GRAMMAR.parse_event("s07 Social_Networking c3 t2") == e
    windows = [TraceWindow(5, "2016-04-20", [TraceEvent(0, 0, 0, 0), TraceEvent(47, 19, 5, 3)]),
               TraceWindow(6, "2016-04-23", [TraceEvent(12, 18, 2, 1)])]
    text = GRAMMAR.format_windows(windows)
    assert text.splitlines()[0] == "# user 5 2016-04-20 Wed" and "# user 6 2016-04-23 Sat" in text
    assert GRAMMAR.parse_windows(text) == windows


def test_levels_cover_record_counts():
    assert level_of(np.array([1, 2, 3, 7, 8, 19, 20, 500])).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for level in range(4):
        lo, hi = records_range(level)
        assert level_of(np.array([lo, hi])).tolist() == [level, level]


@pytest.mark.parametrize("line, message", [
    ("s07 Social_Networking c3", "expected 4 space-separated fields"),
    ("s48 Social_Networking c3 t2", "unknown slot 's48'"),
    ("s07 Social Networking c3 t2", "expected 4"),
    ("s07 Gaming c3 t2", "unknown app category 'Gaming'"),
    ("s07 Games c6 t2", "unknown location cluster 'c6'"),
    ("s07 Games c3 t9", "unknown traffic level 't9'"),
])
def test_a_bad_line_is_reported_with_its_line_number(line, message):
    text = f"# user 1 2016-04-20 Wed\ns01 Games c0 t0\n{line}\n\n"
    with pytest.raises(TraceGrammarError, match=message) as err:
        GRAMMAR.parse_windows(text, source="traces.txt")
    assert err.value.line == 3 and str(err.value).startswith("traces.txt:3:")


def test_slots_must_increase_and_headers_must_be_consistent():
    with pytest.raises(TraceGrammarError, match="does not follow") as err:
        GRAMMAR.parse_windows("# user 1 2016-04-20 Wed\ns05 Games c0 t0\ns05 News c0 t0\n")
    assert err.value.line == 3
    with pytest.raises(TraceGrammarError, match="is a Wed, not a Mon"):
        GRAMMAR.parse_windows("# user 1 2016-04-20 Mon\ns05 Games c0 t0\n")
    with pytest.raises(TraceGrammarError, match="outside a window") as err:
        GRAMMAR.parse_windows("s05 Games c0 t0\n")
    assert err.value.line == 1


def test_windows_hold_the_dominant_pair_of_each_active_slot():
    t0 = pd.Timestamp("2016-04-20 08:00")
    events = pd.DataFrame({
        "user_id": [1] * 5 + [2],
        "timestamp": [t0, t0 + pd.Timedelta(minutes=5), t0 + pd.Timedelta(minutes=9), t0 + pd.Timedelta(minutes=40),
                      t0 + pd.Timedelta(days=1), t0],
        "app_category": [4, 4, 1, 1, 2, 3], "location_id": [10, 10, 11, 11, 12, 10]})
    cluster = {10: 0, 11: 1, 12: 2}
    of = lambda ids: np.array([cluster[i] for i in ids])
    windows = windows_from_events(events, of, GRAMMAR)
    assert [(w.user_id, w.date) for w in windows] == [(1, "2016-04-20"), (1, "2016-04-21"), (2, "2016-04-20")]
    assert windows[0].events == [TraceEvent(16, 4, 0, 1), TraceEvent(17, 1, 1, 0)]   # 3 records in s16 -> t1
    pairs = history_pairs(events, of, len(APP_CATEGORIES), 6)
    assert pairs.sum() == 4 and pairs[4, 0] and pairs[1, 1] and not pairs[4, 1]


def test_field_tokens_concatenate_to_the_tokenized_text(tokenizer):
    tokens = GrammarTokens(GRAMMAR, tokenizer)
    events = [TraceEvent(s, c, k, v) for s, c, k, v in [(0, 0, 0, 0), (9, 18, 5, 3), (47, 12, 2, 1)]]
    text = GRAMMAR.format_events(events)
    assert tokens.encode_events(events) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(tokens.encode_events(events)) == text


def _random_walk(tokens, constraint, steps, seed):
    """Drive the processor with random scores, as sampling would; return the generated text."""
    processor = TraceLogitsProcessor(tokens, [constraint])
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(1, 3, dtype=torch.long)
    vocab = len(tokens.tokenizer)
    for _ in range(steps):
        scores = processor(ids, torch.randn(1, vocab, generator=gen))
        token = int(torch.distributions.Categorical(logits=scores[0]).sample())
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        if token == tokens.eos:
            break
    return tokens.tokenizer.decode(ids[0, 3:].tolist(), skip_special_tokens=True), processor.states[0]


@pytest.mark.parametrize("seed", range(4))
def test_constrained_random_walks_stay_in_the_grammar_and_the_permitted_pairs(tokenizer, seed):
    tokens = GrammarTokens(GRAMMAR, tokenizer)
    pairs = np.zeros((len(APP_CATEGORIES), 6), bool)
    pairs[4, 0] = pairs[4, 2] = pairs[1, 1] = True
    text, state = _random_walk(tokens, TraceConstraint(pairs), 400, seed)
    events = GRAMMAR.parse_events(text)   # strict: well-formed, slots strictly increasing
    assert events and all(pairs[e.category, e.cluster] for e in events)
    assert state.done or len(text) > 0


def test_the_exploration_budget_bounds_unseen_pairs(tokenizer):
    tokens = GrammarTokens(GRAMMAR, tokenizer)
    pairs = np.zeros((len(APP_CATEGORIES), 6), bool)
    pairs[0, 0] = True
    for seed in range(3):
        text, _ = _random_walk(tokens, TraceConstraint(pairs, exploration_budget=2), 600, seed)
        events = GRAMMAR.parse_events(text[: text.rfind("\n") + 1])
        unseen = sum(not pairs[e.category, e.cluster] for e in events)
        assert unseen <= 2
        assert unseen >= 1   # random scores almost surely spend the budget: exploration is possible


def test_a_constraint_permitting_nothing_is_refused():
    with pytest.raises(ValueError, match="allows no"):
        TraceConstraint(np.zeros((20, 6), bool))
    TraceConstraint(np.zeros((20, 6), bool), exploration_budget=1)   # exploring only: allowed


def test_the_history_prior_steers_sampling_inside_the_constraint(tokenizer):
    tokens = GrammarTokens(GRAMMAR, tokenizer)
    pairs = np.zeros((len(APP_CATEGORIES), 6), bool)
    pairs[4, 0] = pairs[1, 1] = True
    counts = np.zeros(len(APP_CATEGORIES))
    counts[4] = 1000
    constraint = TraceConstraint(pairs, category_counts=counts)
    processor = TraceLogitsProcessor(tokens, [constraint], history_weight=30.0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.zeros(1, 3, dtype=torch.long)
    for _ in range(200):
        scores = processor(ids, torch.randn(1, len(tokenizer), generator=gen))
        token = int(torch.distributions.Categorical(logits=scores[0]).sample())
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        if token == tokens.eos:
            break
    text = tokenizer.decode(ids[0, 3:].tolist(), skip_special_tokens=True)
    events = GRAMMAR.parse_events(text[: text.rfind("\n") + 1])
    assert events and all(e.category == 4 and e.cluster == 0 for e in events)


def test_the_history_prior_never_changes_the_chance_of_ending_the_window(tokenizer):
    tokens = GrammarTokens(GRAMMAR, tokenizer)
    slots = np.zeros(GRAMMAR.slots_per_day)
    slots[[20, 21, 40]] = [500, 5, 1]
    constraint = TraceConstraint(np.ones((len(APP_CATEGORIES), 6), bool), slot_counts=slots)
    ids = torch.tensor([tokens.encode_events([TraceEvent(3, 0, 0, 0)])])
    scores = torch.randn(1, len(tokenizer), generator=torch.Generator().manual_seed(1))
    probs = {}
    for weight in (0.0, 1.0, 5.0):
        processor = TraceLogitsProcessor(tokens, [constraint], history_weight=weight)
        processor.prompt_len = 0
        for token in ids[0].tolist():
            processor.advance(processor.states[0], token)
        processor.prompt_len = ids.shape[1]
        probs[weight] = processor(ids, scores.clone()).softmax(-1)[0]
    assert probs[0.0][tokens.eos] > 0
    for weight in (1.0, 5.0):
        assert torch.isclose(probs[weight][tokens.eos], probs[0.0][tokens.eos], atol=1e-6)


def test_the_category_prior_follows_the_users_transitions_from_the_second_line_on(tokenizer):
    tokens = GrammarTokens(GRAMMAR, tokenizer)
    n_a = len(APP_CATEGORIES)
    counts, transitions = np.zeros(n_a), np.zeros((n_a, n_a))
    counts[[4, 1]] = [60, 40]
    transitions[4, 1] = transitions[1, 4] = 30                 # the user alternates 4 -> 1 -> 4
    constraint = TraceConstraint(np.ones((n_a, 6), bool), category_counts=counts, transition_counts=transitions)
    row = constraint.transition_prior[4]
    assert row.sum() == pytest.approx(1) and row[1] == pytest.approx((30 + 2 * constraint.category_prior[1]) / 32)
    processor = TraceLogitsProcessor(tokens, [constraint], history_weight=1.0)
    state = processor.states[0]
    for token in tokens.fields[0][3]:                                                   # the day's first slot
        processor.advance(state, token)
    np.testing.assert_array_equal(processor._prior(state), constraint.category_prior)
    for token in tokens.encode_events([TraceEvent(3, 4, 0, 0)])[len(tokens.fields[0][3]):] + tokens.fields[0][5]:
        processor.advance(state, token)                                                 # a line of category 4, slot 5
    assert state.last_category == 4 and state.field == 1
    np.testing.assert_array_equal(processor._prior(state), row)
    without = TraceConstraint(np.ones((n_a, 6), bool), category_counts=counts)
    assert without.transition_prior is None
