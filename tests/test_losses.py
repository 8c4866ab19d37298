"""BCE / focal / triplet losses on hand-made batches with hand-computed answers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hpasc.config import LossConfig
from hpasc.losses import (
    Criterion,
    batch_hard_triplet,
    group_targets,
    pairwise_distances,
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
