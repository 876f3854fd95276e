"""The KD math: top-k compression, aggregation of soft labels, distillation losses."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune import distill


def test_aggregation_of_hand_made_topk_logits_is_the_weighted_mean_of_probabilities():
    # One position, temperature 2. Client A (3 examples) keeps ids [2, 0] with logits [ln 9, 0]:
    # softmax([ln 9, 0] / 2) = softmax([ln 3, 0]) = [3/4, 1/4]. Client B (1 example) keeps ids [2, 4]
    # with equal logits: [1/2, 1/2]. Each gives 0 to ids outside its top-k, so the mean over the union
    # {0, 2, 4} is  id 0: (3 * 1/4) / 4 = 0.1875,  id 2: (3 * 3/4 + 1/2) / 4 = 0.6875,  id 4: (1/2) / 4 = 0.125.
    a_ids, a_vals = torch.tensor([[2, 0]], dtype=torch.int32), torch.tensor([[math.log(9), 0.0]]).half()
    b_ids, b_vals = torch.tensor([[2, 4]], dtype=torch.int32), torch.tensor([[0.0, 0.0]]).half()
    ids, probs = distill.aggregate_topk(
        [(a_ids, distill.probs(a_vals, 2.0)), (b_ids, distill.probs(b_vals, 2.0))], [3, 1])
    got = {int(i): float(p) for i, p in zip(ids[0], probs[0])}
    assert set(got) == {0, 2, 4}
    # ln 9 in float16 is 2.197265625 (not 2.1972245...), hence the tolerance.
    assert got == pytest.approx({0: 0.1875, 2: 0.6875, 4: 0.125}, abs=2e-5)


def test_aggregation_pads_short_rows_and_adds_repeated_ids():
    # Row 0: both clients keep the same two ids (union of 2); row 1: disjoint (union of 4).
    a = (torch.tensor([[1, 2], [5, 6]]), torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    b = (torch.tensor([[2, 1], [7, 8]]), torch.tensor([[0.8, 0.2], [0.6, 0.4]]))
    ids, probs = distill.aggregate_topk([a, b], [1, 1])
    assert ids.shape == probs.shape == (2, 4)
    assert ids[0, :2].tolist() == [1, 2] and probs[0].tolist() == pytest.approx([0.35, 0.65, 0.0, 0.0])
    assert ids[1].tolist() == [5, 6, 7, 8] and probs[1].tolist() == pytest.approx([0.45, 0.05, 0.3, 0.2])
    assert probs.sum(-1).tolist() == pytest.approx([1.0, 1.0])


def test_dense_aggregation_is_the_weighted_mean():
    p1, p2 = torch.tensor([[0.2, 0.8]]), torch.tensor([[0.6, 0.4]])
    assert distill.aggregate_dense([p1, p2], [1, 3]).tolist() == [pytest.approx([0.5, 0.5])]
    with pytest.raises(ValueError, match="not all zero"):
        distill.aggregate_dense([p1], [0])


def test_kl_is_zero_when_student_equals_teacher_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(5, 7)
    for T in (1.0, 2.5):
        teacher = distill.probs(logits, T)
        assert float(distill.distill_loss(logits, teacher, T)) == pytest.approx(0.0, abs=1e-6)
        assert float(distill.distill_loss(logits + torch.randn(5, 7), teacher, T)) > 1e-3
        # A sparse teacher that covers the whole vocabulary is the dense one.
        ids = torch.arange(7).expand(5, 7)
        assert float(distill.sparse_distill_loss(logits, ids, teacher, T)) == pytest.approx(0.0, abs=1e-6)


def naive_kl(student, teacher, T):
    """T^2 * mean_rows sum_v p_v * log(p_v / q_v), softmax written out by hand."""
    e = torch.exp(student / T)
    q = e / e.sum(-1, keepdim=True)
    mask = teacher > 0
    terms = torch.where(mask, teacher * torch.log(torch.where(mask, teacher, 1.0) / q), torch.zeros_like(q))
    return T**2 * terms.sum(-1).mean()


def test_loss_gradients_match_a_naive_formula_and_the_closed_form():
    torch.manual_seed(1)
    T, n, vocab, k = 2.0, 4, 9, 3
    teacher_logits = torch.randn(n, vocab)
    dense_teacher = distill.probs(teacher_logits, T)
    ids, vals = distill.topk_compress(teacher_logits, k)
    sparse_p = distill.probs(vals, T)
    sparse_dense = torch.zeros(n, vocab).scatter_(-1, ids.long(), sparse_p)

    for loss_fn, teacher in [
        (lambda s: distill.distill_loss(s, dense_teacher, T), dense_teacher),
        (lambda s: distill.sparse_distill_loss(s, ids, sparse_p, T), sparse_dense),
    ]:
        student = torch.randn(n, vocab, dtype=torch.float64)
        s1 = student.clone().float().requires_grad_()
        s2 = student.clone().float().requires_grad_()
        ours, ref = loss_fn(s1), naive_kl(s2, teacher, T)
        ours.backward()
        ref.backward()
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
        torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-7)
        # d/dz [T^2 KL(p || softmax(z/T))] averaged over n rows = T (q - p) / n
        q = torch.softmax(s1.detach() / T, dim=-1)
        torch.testing.assert_close(s1.grad, T * (q - teacher) / n, rtol=1e-5, atol=1e-7)


def test_topk_round_trip():
    torch.manual_seed(2)
    logits = torch.randn(6, 50) * 3
    ids, vals = distill.topk_compress(logits, 5)
    assert ids.dtype == torch.int32 and vals.dtype == torch.float16 and ids.shape == vals.shape == (6, 5)
    assert torch.equal(ids.long(), logits.topk(5, dim=-1).indices)
    dense = distill.topk_dense(ids, vals, 50)
    kept = torch.zeros(6, 50, dtype=torch.bool).scatter_(-1, ids.long(), True)
    torch.testing.assert_close(dense[kept], logits[kept], rtol=1e-3, atol=1e-3)  # float16 rounding
    assert torch.isinf(dense[~kept]).all()
    # The dense softmax of the round trip is the renormalized top-k distribution.
    sparse = torch.zeros(6, 50).scatter_(-1, ids.long(), distill.probs(vals, 1.0))
    torch.testing.assert_close(torch.softmax(dense, -1), sparse)
    masked = torch.where(kept, logits, torch.tensor(float("-inf")))
    torch.testing.assert_close(sparse, torch.softmax(masked, -1), rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="k <= 50"):
        distill.topk_compress(logits, 51)


# --------------------------------------------------------------------------- label skew


def skewed_prompts():
    """Three classes, four prompts of each; the true likelihood p(x | y) is 0.6 on the prompt's class, 0.2 elsewhere."""
    likelihood = torch.tensor([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]]).repeat_interleave(4, 0)
    return likelihood, torch.arange(3).repeat_interleave(4)


def test_prior_correction_undoes_a_bayes_clients_label_prior():
    likelihood, _ = skewed_prompts()
    counts = torch.tensor([30.0, 0.0, 5.0])
    prior = distill.label_prior(counts)
    assert prior.tolist() == pytest.approx([31 / 38, 1 / 38, 6 / 38])
    client = distill.normalize(likelihood * prior)  # p_i(y | x) ∝ p(x | y) prior_i(y)
    torch.testing.assert_close(distill.prior_correct(client, prior), likelihood)
    # The logit form the client sends: its softmax at T is the corrected vote.
    logits = torch.randn(12, 3)
    for T in (1.0, 2.0):
        torch.testing.assert_close(distill.probs(distill.prior_correct_logits(logits, prior, T), T),
                                   distill.prior_correct(distill.probs(logits, T), prior))
    with pytest.raises(ValueError, match="positive prior"):
        distill.prior_correct(client, torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="non-negative"):
        distill.label_prior(torch.tensor([1.0, -1.0]))


def test_under_label_skew_the_plain_mean_picks_the_wrong_class_and_the_corrected_aggregation_the_right_one():
    # Client A holds 200 examples of class 0 only and has collapsed: it says [0.98, 0.005, 0.015] to every prompt
    # (its votes for classes it never saw are noise). Client B holds classes 1 and 2 (10 each), client C classes
    # 0 and 1 (10 each); both are Bayes-optimal under their own priors.
    likelihood, truth = skewed_prompts()
    counts = [torch.tensor([200.0, 0, 0]), torch.tensor([0.0, 10, 10]), torch.tensor([10.0, 10, 0])]
    votes = [torch.tensor([[0.98, 0.005, 0.015]]).expand(12, 3)]
    votes += [distill.normalize(likelihood * distill.label_prior(c)) for c in counts[1:]]
    examples = [float(c.sum()) for c in counts]
    corrected = [distill.prior_correct(p, distill.label_prior(c)) for p, c in zip(votes, counts)]

    def accuracy(p):
        return float((p.argmax(-1) == truth).float().mean())

    # The example-weighted mean follows the big client's prior: class 0 for every prompt.
    assert distill.aggregate_dense(votes, examples).argmax(-1).tolist() == [0] * 12
    # Each correction alone is not enough: dividing A's noise by its tiny priors makes it vote for class 2 ...
    assert distill.aggregate_dense(corrected, examples).argmax(-1).tolist() == [2] * 12
    # ... and weighting the raw votes by class counts still lets A's collapsed class-0 vote win everywhere.
    assert accuracy(distill.aggregate_class_weighted(votes, counts)) == pytest.approx(1 / 3)
    # Prior-corrected votes weighted per class by the clients' counts of it: every prompt right.
    both = distill.aggregate_class_weighted(corrected, counts)
    assert both.argmax(-1).tolist() == truth.tolist()
    assert both.sum(-1).tolist() == pytest.approx([1.0] * 12)
    # Sharpening keeps the decision and lowers the entropy.
    sharp = distill.sharpen(both, 2.0)
    assert sharp.argmax(-1).tolist() == truth.tolist()
    entropy = lambda p: float(-(p * p.log()).sum(-1).mean())  # noqa: E731
    assert entropy(sharp) < entropy(both)


def test_class_weighted_aggregation_by_hand():
    # Two clients, two classes. Class 0: only client 1 holds it -> its vote 0.3. Class 1: counts 1 and 3 ->
    # (1 * 0.9 + 3 * 0.7) / 4 = 0.75. Row renormalized: [0.3, 0.75] / 1.05.
    p1, p2 = torch.tensor([[0.1, 0.9]]), torch.tensor([[0.3, 0.7]])
    got = distill.aggregate_class_weighted([p1, p2], [torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])])
    assert got.tolist() == [pytest.approx([0.3 / 1.05, 0.75 / 1.05])]
    # A class no client holds falls back to the plain mean of the votes for it.
    got = distill.aggregate_class_weighted([p1, p2], [torch.tensor([0.0, 1.0]), torch.tensor([0.0, 3.0])])
    assert got.tolist() == [pytest.approx([0.2 / 0.95, 0.75 / 0.95])]
    with pytest.raises(ValueError, match="2 clients but 1"):
        distill.aggregate_class_weighted([p1, p2], [torch.tensor([1.0, 1.0])])


def test_sharpen_is_a_renormalized_power():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    assert distill.sharpen(p, 2.0).tolist() == [pytest.approx([0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38, 0.0])]
    torch.testing.assert_close(distill.sharpen(p, 1.0), p)
    # A large power does not underflow: the argmax gets (almost) all the mass.
    assert distill.sharpen(torch.tensor([[1e-20, 2e-20]]), 200.0).tolist() == [pytest.approx([0.0, 1.0])]
    with pytest.raises(ValueError, match="positive power"):
        distill.sharpen(p, 0.0)
