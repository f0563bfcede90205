import math

import pytest
import torch

from pipeline.engine.checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint
from pipeline.engine.schedule import lr_at, scale_lr


@pytest.mark.parametrize(("rule", "expected"), [
    # Goyal et al. 2017: base 0.1 at batch 256 -> batch 2048 (8x) is 0.8 with the linear rule;
    # the square-root rule gives 0.1 * 2 sqrt(2) = 0.28284271247461906.
    ("none", 0.1), ("linear", 0.8), ("sqrt", 0.28284271247461906),
])
def test_scaling_rules(rule, expected):
    assert scale_lr(0.1, 256, 2048, rule) == pytest.approx(expected, rel=1e-12)


def test_scaling_rule_unknown():
    with pytest.raises(ValueError, match="cubic"):
        scale_lr(0.1, 256, 512, "cubic")


def test_warmup_is_linear_from_base_to_peak_then_constant():
    lrs = [lr_at(s, base_lr=0.1, peak_lr=0.8, warmup_steps=7, total_steps=20) for s in range(20)]
    assert lrs[0] == pytest.approx(0.1)
    for s in range(7):  # equal increments of (0.8 - 0.1) / 7
        assert lrs[s] == pytest.approx(0.1 + 0.1 * s)
    assert all(x == pytest.approx(0.8) for x in lrs[7:])


def test_warmup_never_starts_above_the_lr_it_leads_to():
    """A batch below the base batch (a batch-size schedule's unit of 16 against a base of 64,
    linear rule: 1/4 of the base LR) has nothing to warm up to: the ramp is flat at the scaled
    LR, not a ramp down from 4x it."""
    peak = scale_lr(0.05, 64, 16, "linear")
    lrs = [lr_at(s, base_lr=0.05, peak_lr=peak, warmup_steps=4, total_steps=10) for s in range(6)]
    assert lrs == [peak] * 6 == [0.0125] * 6


def test_decay_counts_from_the_end_of_warmup():
    # 10 warmup steps (0..9), then steps 10..110: progress (step - 10) / 100, so 0.25 at step
    # 35, 0.5 at 60, 0.75 at 85 and 1 at the last step trained, 110 = total_steps - 1.
    kw = dict(base_lr=0.1, peak_lr=1.0, warmup_steps=10, total_steps=111)
    assert lr_at(9, schedule="step", **kw) == pytest.approx(0.1 + 0.9 * 9 / 10)
    assert [lr_at(s, schedule="step", **kw) for s in (10, 59, 60, 84, 85, 110)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    assert lr_at(35, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.sqrt(0.5)))  # cos(pi/4)
    assert lr_at(60, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_at(110, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_at(5, base_lr=0.1, peak_lr=1.0, warmup_steps=0, total_steps=10, schedule="linear")


def test_cosine_and_step_decay():
    # Steps 0..100 (total 101): progress step / 100.
    kw = dict(base_lr=0.1, peak_lr=1.0, warmup_steps=0, total_steps=101)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(50, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_at(100, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert [lr_at(s, schedule="step", **kw) for s in (49, 50, 74, 75)] == pytest.approx(
        [1.0, 0.1, 0.1, 0.01])


@pytest.mark.parametrize("total", [3, 7, 100])
def test_last_step_trained_is_the_schedules_end(total):
    """Steps 0..total-1 are trained: the first after warmup gets the peak, the last one the
    schedule's final value."""
    kw = dict(base_lr=0.1, peak_lr=1.0, warmup_steps=1, total_steps=total)
    assert lr_at(total - 1, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(total - 1, schedule="step", **kw) == pytest.approx(0.01)
    assert lr_at(1, schedule="cosine", **kw) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_a_schedule_with_no_room_to_decay_trains_its_step_at_the_peak(schedule):
    """One step after warmup (or a one-step run): that step is both the first after warmup
    and the last; at the schedule's end (0 for cosine) it would train nothing."""
    assert lr_at(2, base_lr=0.1, peak_lr=1.0, warmup_steps=2, total_steps=3,
                 schedule=schedule) == 1.0
    assert lr_at(0, base_lr=0.1, peak_lr=1.0, warmup_steps=0, total_steps=1,
                 schedule=schedule) == 1.0


def test_checkpoint_roundtrip_and_latest(tmp_path):
    m = torch.nn.Linear(2, 2)
    for step, epoch in ((10, 0), (30, 2), (20, 1)):
        save_checkpoint(tmp_path / f"c{step}", {"model": m.state_dict(), "step": step, "epoch": epoch})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "meta.json").write_text('{"step": 99, "epoch": 9}')  # no state.pt
    latest = find_latest_checkpoint(tmp_path)
    assert latest == tmp_path / "c30"
    state = load_checkpoint(latest)
    assert state["step"] == 30 and state["epoch"] == 2
    assert not list(tmp_path.rglob("*.tmp"))
    assert find_latest_checkpoint(tmp_path / "nothing-here") is None
