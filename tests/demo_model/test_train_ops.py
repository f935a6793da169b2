"""The demo trainer's pieces: the selective-copying instances have the task's structure, the learning
rate schedule, the held-out split is the one the shipped sample was drawn from. (The trainer runs the
reference ops; tests/foundation/test_ops_ref.py checks their values and gradients.)"""
import json
import os

import pytest
import torch

from mamba_rt.demo import COPYING_MODEL_DIR, DEMO_MODEL_DIR
from mamba_rt.demo_train import (COPY_BLANK, COPY_FIRST_DATA, COPY_MARKER, COPY_VOCAB, copying_batch, is_heldout,
                                 lr_at)


def _fresh_generator() -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed)


def test_copying_instances_have_the_task_structure():
    region, tokens = 40, 6
    ids, answers = copying_batch(200, _fresh_generator(), region=region, tokens=tokens)
    assert ids.shape == (200, region + tokens) and answers.shape == (200, tokens)
    assert (ids[:, region:] == COPY_MARKER).all()
    body = ids[:, :region]
    data_mask = body != COPY_BLANK
    assert (data_mask.sum(1) == tokens).all()  # data tokens at distinct positions
    assert ((body[data_mask] >= COPY_FIRST_DATA) & (body[data_mask] < COPY_VOCAB)).all()
    # the answers are the data tokens in the order they appear
    assert torch.equal(body[data_mask].reshape(200, tokens), answers)
    # the instances differ (a stuck generator would give one instance 200 times)
    assert len({tuple(r) for r in ids.tolist()}) > 190


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    peak, steps, warm = 2e-3, 1000, 100
    lrs = [lr_at(s, steps, peak, warm) for s in range(steps)]
    assert lrs[0] == pytest.approx(peak / warm) and max(lrs) == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    assert lr_at(steps, steps, peak, warm) == pytest.approx(0.1 * peak)


def test_shipped_sample_is_from_the_heldout_split_and_logs_are_complete():
    log = json.loads((DEMO_MODEL_DIR / "train_log.json").read_text())
    pct = log["heldout_percent"]
    assert log["sample_files"] and all(is_heldout(f, pct) for f in log["sample_files"])
    assert (DEMO_MODEL_DIR / "heldout_sample.txt").stat().st_size == log["sample_bytes"]
    assert log["steps_done"] == log["steps_planned"] and not log["stopped_early"]
    cp = json.loads((COPYING_MODEL_DIR / "train_log.json").read_text())
    assert cp["steps_done"] == cp["steps_planned"] and cp["eval_accuracy"] >= 0.99
