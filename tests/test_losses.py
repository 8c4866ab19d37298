"""BCE / focal / triplet losses on hand-made batches with hand-computed answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpasc.config import LossConfig
from hpasc.losses import (
    Criterion,
    batch_hard_triplet,
    group_targets,
    pairwise_distances,
    segment_pool,
    single_label_identities,
)


def test_batch_hard_triplet_hand_computed():
    # distances: d01=1 d02=2 d03=3 d12=sqrt5 d13=sqrt10 d23=1; point 4 has no identity and is ignored
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 3.0], [0.1, 0.1]], requires_grad=True)
    ids = torch.tensor([0, 0, 1, 1, -1])
    margin = 1.5
    # anchor: hardest positive - hardest negative + margin
    expected = [1 - 2 + margin, 1 - math.sqrt(5) + margin, 1 - 2 + margin, max(0.0, 1 - 3 + margin)]
    loss = batch_hard_triplet(emb, ids, margin)
    assert loss.item() == pytest.approx(sum(expected) / 4, abs=1e-5)
    loss.backward()
    assert emb.grad[4].abs().sum() == 0  # the unlabelled sample takes no part
    assert emb.grad[:4].abs().sum() > 0


def test_batch_hard_triplet_singleton_identity_is_a_negative_only():
    # id 2 has no positive: not an anchor, but it is the hardest negative of anchor 0 (distance 0.5)
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.5]])
    loss = batch_hard_triplet(emb, torch.tensor([0, 0, 2]), margin=1.0)
    anchor0 = 1 - 0.5 + 1.0
    anchor1 = 1 - math.sqrt(1.25) + 1.0
    assert loss.item() == pytest.approx((anchor0 + anchor1) / 2, abs=1e-5)


def test_batch_hard_triplet_without_anchors_is_zero_with_graph():
    emb = torch.randn(4, 3, requires_grad=True)
    loss = batch_hard_triplet(emb, torch.tensor([0, 1, 2, -1]), margin=0.3)  # nobody has a positive
    assert loss.item() == 0.0
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() == 0


def test_batch_hard_triplet_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(12, 5, generator=gen), dim=1)
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 0, -1, 3, 1, -1, 2])
    d = torch.cdist(emb, emb)
    terms = []
    for a in range(12):
        if ids[a] < 0:
            continue
        pos = [d[a, p] for p in range(12) if p != a and ids[p] == ids[a]]
        neg = [d[a, n] for n in range(12) if ids[n] >= 0 and ids[n] != ids[a]]
        if pos and neg:
            terms.append(max(0.0, float(max(pos) - min(neg)) + 0.2))
    assert batch_hard_triplet(emb, ids, 0.2).item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)


def test_pairwise_distances():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert torch.allclose(pairwise_distances(x), torch.tensor([[0.0, 5.0], [5.0, 0.0]]), atol=1e-5)


def test_single_label_identities_and_group_targets():
    t = torch.tensor([[0, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1.0]])
    assert single_label_identities(t).tolist() == [1, -1, -1, 2]
    g = group_targets(t, torch.tensor([0, 0, 1, 1]))
    assert g.tolist() == [[1, 1, 0], [0, 0, 1]]


def _outputs(logits):
    return {"logits": logits, "embedding": F.normalize(torch.ones(len(logits), 2), dim=1)}


def test_criterion_plain_bce_and_total():
    logits = torch.tensor([[2.0] + [-1.0] * 18, [0.5] * 19])
    target = torch.zeros(2, 19)
    target[0, 0] = 1
    target[1, 5] = 1
    crit = Criterion(LossConfig(triplet_weight=0.5, bce_weight=2.0))
    out = crit(_outputs(logits), {"target": target})
    expected = F.binary_cross_entropy_with_logits(logits, target)
    assert out["bce"].item() == pytest.approx(expected.item(), rel=1e-6)
    # identical embeddings, identities 0 and 5: no positives -> triplet 0
    assert out["triplet"].item() == 0.0
    assert out["loss"].item() == pytest.approx(2.0 * expected.item(), rel=1e-6)


def test_criterion_label_smoothing_focal_and_class_weights():
    logits = torch.tensor([[0.0, 2.0] + [0.0] * 17])
    target = torch.zeros(1, 19)
    target[0, 1] = 1
    # smoothing 0.1: targets 0.95 / 0.05
    out = Criterion(LossConfig(label_smoothing=0.1, triplet_weight=0.0))(_outputs(logits), {"target": target})
    soft = target * 0.9 + 0.05
    assert out["bce"].item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, soft).item(), rel=1e-6)
    # focal gamma 2 for a single logit: (1 - p_t)^2 * bce with p_t = sigmoid(2) for the true class
    one = torch.tensor([[2.0] + [-30.0] * 18])
    t1 = torch.zeros(1, 19)
    t1[0, 0] = 1
    out = Criterion(LossConfig(focal_gamma=2.0, triplet_weight=0.0))(_outputs(one), {"target": t1})
    p = 1 / (1 + math.exp(-2.0))
    assert out["bce"].item() == pytest.approx((1 - p) ** 2 * -math.log(p) / 19, rel=1e-4)
    # class weights: only class 0 counts
    weights = [1.0] + [0.0] * 18
    out = Criterion(LossConfig(class_weights=tuple(weights), triplet_weight=0.0))(_outputs(one), {"target": t1})
    assert out["bce"].item() == pytest.approx(-math.log(p) / 19, rel=1e-5)


def test_criterion_image_head_and_bad_input():
    crit = Criterion(LossConfig(triplet_weight=0.0, image_weight=1.0))
    target = torch.zeros(3, 19)
    target[0, 2] = target[1, 4] = target[2, 7] = 1
    outputs = {**_outputs(torch.zeros(3, 19)), "image_logits": torch.zeros(2, 19)}
    out = crit(outputs, {"target": target, "group": torch.tensor([0, 0, 1])})
    assert out["image_bce"].item() == pytest.approx(math.log(2), rel=1e-6)  # zero logits: log 2 whatever the target
    assert out["loss"].item() == pytest.approx(2 * math.log(2), rel=1e-6)
    with pytest.raises(KeyError, match="target"):
        crit(_outputs(torch.zeros(1, 19)), {})
    with pytest.raises(ValueError, match="class_weights"):
        Criterion(LossConfig(class_weights=(1.0, 2.0)))


def test_segment_pool_hand_computed():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [5.0, -1.0]])
    g = torch.tensor([0, 0, 1])
    assert segment_pool(x, g, "max").tolist() == [[2.0, 3.0], [5.0, -1.0]]
    assert segment_pool(x, g, "mean").tolist() == [[1.0, 2.0], [5.0, -1.0]]
    lse = segment_pool(x, g, "lse", 1.0)
    assert lse[0, 0].item() == pytest.approx(math.log((1 + math.exp(2)) / 2), rel=1e-6)
    assert lse[1].tolist() == pytest.approx([5.0, -1.0])  # one cell: its own logit
    # sharpness 0.5: log(mean(exp(x / 2))) * 2; large sharpness -> the max, small -> the mean
    assert segment_pool(x, g, "lse", 0.5)[0, 1].item() == pytest.approx(
        2 * math.log((math.exp(0.5) + math.exp(1.5)) / 2), rel=1e-6)
    assert segment_pool(x, g, "lse", 200.0)[0].tolist() == pytest.approx([2.0, 3.0], abs=0.01)
    assert segment_pool(x, g, "lse", 1e-4)[0].tolist() == pytest.approx([1.0, 2.0], abs=0.01)
    # huge logits do not overflow
    assert segment_pool(torch.tensor([[1000.0], [1000.0]]), torch.tensor([0, 0]), "lse", 1.0).item() == 1000.0
    with pytest.raises(ValueError, match="lse, max, mean"):
        segment_pool(x, g, "median")


def test_criterion_mil_pools_each_image_with_its_banked_cells():
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus: BCE of logit -x against target 1
    crit = Criterion(LossConfig(triplet_weight=0.0, bce_weight=0.0, mil_weight=2.0, mil_pool="max"))
    logits = torch.full((3, 19), -30.0)
    logits[0, 2] = 3.0  # image 0: cell 0 shows class 2, cell 1 does not; image 1 (one cell) shows nothing
    logits.requires_grad_(True)
    target = torch.zeros(3, 19)
    target[0, 2] = target[1, 2] = target[2, 7] = 1  # weak labels: image 0 -> class 2, image 1 -> class 7
    batch = {"target": target, "group": torch.tensor([0, 0, 1])}
    out = crit(_outputs(logits), batch)
    # max pooling, image g weighted by its cells / B: image 0 costs softplus(-3) for class 2, image 1
    # softplus(30) for class 7, every other class softplus(-30)
    rest = 18 * sp(-30.0)
    expected = (2 * (sp(-3.0) + rest) / 19 + 1 * (sp(30.0) + rest) / 19) / 3
    assert out["mil"].item() == pytest.approx(expected, rel=1e-5)
    assert out["loss"].item() == pytest.approx(2 * expected, rel=1e-5)
    out["loss"].backward()
    assert logits.grad[1, 2] == 0  # the cell without class 2 is not pushed up: max pooling picked cell 0
    assert logits.grad[0, 2] < 0 and logits.grad[2, 7] < 0
    # image 1 has a second, banked cell that shows class 7: the pool takes it, the live cell is left alone
    bank = torch.full((1, 19), -30.0)
    bank[0, 7] = 4.0
    live = logits.detach().clone().requires_grad_(True)
    banked = crit(_outputs(live), {**batch, "bank_logits": bank, "bank_group": torch.tensor([1]),
                                   "group_size": torch.tensor([2, 2])})
    assert banked["mil"].item() == pytest.approx((2 * (sp(-3.0) + rest) + 2 * (sp(-4.0) + rest)) / 19 / 3, rel=1e-5)
    banked["loss"].backward()
    assert live.grad[2, 7] == 0
    with pytest.raises(KeyError, match="group"):
        crit(_outputs(logits), {"target": target})


def test_logit_bank_pools_an_images_other_seen_cells():
    from hpasc.training.mil_bank import LogitBank

    # rows 0-1 image 0, rows 2-4 image 1, row 5 image 2 (not a training row)
    bank = LogitBank(np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 2, 3, 4]), n_classes=2)
    first = bank.pool_inputs(torch.tensor([3, 1]))
    assert first["group"].tolist() == [1, 0] and first["group_size"].tolist() == [2, 3]
    assert len(first["bank_logits"]) == 0  # nothing seen yet
    bank.update(torch.tensor([0, 2, 4, 3]), torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]))
    got = bank.pool_inputs(torch.tensor([3, 1]))
    # image 0: row 0 (row 1 is live); image 1: rows 2 and 4 (row 3 is live)
    assert got["bank_group"].tolist() == [0, 1, 1]
    assert got["bank_logits"].tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    state = bank.state_dict()
    other = LogitBank(np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 2, 3, 4]), n_classes=2)
    other.load_state_dict(state)
    assert torch.equal(other.logits, bank.logits) and other.seen.tolist() == [True, False, True, True, True, False]
    with pytest.raises(ValueError, match="does not fit"):
        LogitBank(np.array([0, 1]), np.array([0, 1]), n_classes=2).load_state_dict(state)
