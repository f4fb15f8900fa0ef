"""The shared training loop: packed data in a seeded order, the schedule, the objective, and a run
stopped after a checkpoint that resumes to bit-identical weights on the CPU."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.errors import CompressError
from compress.methods.training import TrainingParams, TrainingTask
from compress.train.data import PackedSequences
from compress.train.loop import train
from compress.train.losses import Outputs, objective
from compress.train.schedule import learning_rate


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(compress.embedded_model()), dtype=torch.float32)


def _data(seqlen: int = 32) -> PackedSequences:
    generator = torch.Generator().manual_seed(1)
    return PackedSequences(torch.randint(0, 1000, (40 * seqlen + 7,), generator=generator), seqlen, seed=3)


def test_packed_sequences_cover_every_sequence_once_an_epoch_and_repeat_by_index():
    data = _data()
    assert len(data) == 40 and data.sequences.shape == (40, 32)  # the 7 leftover tokens are dropped
    epoch = torch.cat([data.batch(k, 8) for k in range(5)])
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, data.sequences.tolist()))
    assert torch.equal(data.batch(7, 8), _data().batch(7, 8))  # a pure function of (seed, index)
    assert not torch.equal(data.batch(0, 8), data.batch(5, 8))  # the next epoch is reshuffled
    with pytest.raises(CompressError, match="seqlen=64 needs more"):
        PackedSequences(torch.arange(50), 64, seed=0)


def test_schedule_warms_up_then_decays_to_the_floor():
    params = TrainingParams(steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    rates = [learning_rate(step, params) for step in range(110)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))  # cosine: never rises after warmup
    assert rates[-1] == pytest.approx(1e-4)
    linear = TrainingParams(steps=110, lr=1e-3, warmup_steps=10, schedule="linear")
    assert learning_rate(60, linear) == pytest.approx(1e-3 - 0.9e-3 * 50 / 99)


def test_objective_weights_its_terms_and_kl_to_itself_is_zero():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    hidden = (torch.randn(2, 5, 4), torch.randn(2, 5, 4))
    ids = torch.randint(0, 11, (2, 5))
    params = TrainingParams(ce_weight=0.5, kl_weight=2.0, feature_weight=3.0)
    total, parts = objective(Outputs(logits, hidden), Outputs(logits.clone(), hidden), ids, params)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert parts["kl"] == pytest.approx(0.0, abs=1e-6) and parts["feature"] == 0.0
    assert parts["ce"] == pytest.approx(float(ce)) and float(total) == pytest.approx(0.5 * float(ce), abs=1e-6)
    student = Outputs(torch.randn(2, 5, 11), tuple(h * 2 for h in hidden))
    _, parts = objective(student, Outputs(logits, hidden), ids, params)
    assert parts["kl"] > 0 and parts["feature"] == pytest.approx(2.0)  # mean((2t - t)^2) / mean(t^2) = 1 per block


def test_training_lowers_the_loss_and_logs_one_point_per_interval():
    model, data = _model(), _data()
    params = TrainingParams(steps=12, seqlen=32, batch_size=4, lr=3e-3, warmup_steps=2, log_every=4, checkpoint_every=0)
    result = train(model, TrainingTask(), params, data=data, teacher=lambda: None)
    assert [point["step"] for point in result.curve] == [4, 8, 12]
    assert result.curve[-1]["loss"] < result.curve[0]["loss"]
    assert result.tokens == 12 * 4 * 32 and result.steps == 12 and not model.training


def test_a_run_stopped_after_a_checkpoint_resumes_to_the_same_weights(tmp_path):
    params = TrainingParams(steps=9, seqlen=32, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=2, log_every=2, checkpoint_every=4,
                            kl_weight=0.5, feature_weight=0.1)
    teacher = _model()
    whole = _model()
    train(whole, TrainingTask(), params, data=_data(), teacher=lambda: copy.deepcopy(teacher))

    resumed = _model()
    first = train(resumed, TrainingTask(), params, data=_data(), teacher=lambda: copy.deepcopy(teacher), work_dir=tmp_path, stop_after=6)
    assert first.steps == 6 and (tmp_path / "checkpoint.pt").is_file()  # killed after step 6; the checkpoint holds step 4
    fresh = _model()  # a new process: the model as the stage loads it, the rest from the checkpoint
    second = train(fresh, TrainingTask(), params, data=_data(), teacher=lambda: copy.deepcopy(teacher), work_dir=tmp_path)
    assert second.resumed_at_step == 4 and second.steps == 9
    assert [p["step"] for p in second.curve] == [2, 4, 6, 8, 9]
    for (name, a), b in zip(whole.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_training_params_refuse_what_cannot_train():
    with pytest.raises(ValueError, match="nothing to train on"):
        TrainingParams(ce_weight=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainingParams(steps=5, warmup_steps=5)
    assert math.isclose(TrainingParams().lr, 1e-4)
