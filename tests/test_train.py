"""Training pieces: loss masking and head shifting, CTC, the LR schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from speechllama.train.losses import IGNORE, ctc_loss, head_targets, multi_token_loss
from speechllama.train.schedule import build_scheduler, warmup_cosine

# --- losses -------------------------------------------------------------------------------------


def test_head_targets_shift_by_head_and_stop_at_eos() -> None:
    # Two utterances: y = (5, 6) and y = (7,), EOS = 2, pad = 0; labels = y EOS.
    labels = torch.tensor([[5, 6, 2], [7, 2, 0]])
    lens = torch.tensor([3, 2])
    t = head_targets(labels, lens, num_heads=3)
    assert t.shape == (2, 3, 3)
    i = IGNORE
    assert t[0].tolist() == [[5, 6, 2], [6, 2, i], [2, i, i]]
    assert t[1].tolist() == [[7, 2, i], [2, i, i], [i, i, i]]


def test_multi_token_loss_matches_hand_computation() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([[5, 6, 2], [7, 2, 0]])
    lens = torch.tensor([3, 2])
    logits = torch.randn(2, 3, 2, 9)
    out = multi_token_loss(logits, labels, lens, weights=(1.0, 0.5))

    def ce(b: int, u: int, k: int, target: int) -> float:
        return float(F.cross_entropy(logits[b, u, k][None], torch.tensor([target])))

    head0 = [ce(0, 0, 0, 5), ce(0, 1, 0, 6), ce(0, 2, 0, 2), ce(1, 0, 0, 7), ce(1, 1, 0, 2)]
    head1 = [ce(0, 0, 1, 6), ce(0, 1, 1, 2), ce(1, 0, 1, 2)]
    m0, m1 = sum(head0) / 5, sum(head1) / 3
    assert out.tokens.tolist() == [5, 3]
    assert out.per_head.tolist() == pytest.approx([m0, m1], rel=1e-5)
    assert float(out.total) == pytest.approx(m0 + 0.5 * m1, rel=1e-5)


def test_positions_beyond_eos_do_not_contribute() -> None:
    torch.manual_seed(1)
    labels = torch.tensor([[5, 6, 2, 0, 0]])
    lens = torch.tensor([3])
    logits = torch.randn(1, 5, 2, 9, requires_grad=True)
    loss = multi_token_loss(logits, labels, lens).total
    loss.backward()
    grad = logits.grad[0]
    # Head 0 scores positions 0..2, head 1 positions 0..1; nothing else gets gradient.
    assert grad[3:].abs().sum() == 0
    assert grad[2, 1].abs().sum() == 0
    assert grad[2, 0].abs().sum() > 0 and grad[1, 1].abs().sum() > 0
    # Garbage in masked positions leaves the loss unchanged.
    noisy = logits.detach().clone()
    noisy[0, 3:] = 1e4 * torch.randn_like(noisy[0, 3:])
    noisy[0, 2, 1] = 1e4
    assert float(multi_token_loss(noisy, labels, lens).total) == pytest.approx(loss.item())


def test_single_head_equals_plain_cross_entropy_and_bf16_upcast() -> None:
    torch.manual_seed(2)
    labels = torch.tensor([[4, 3, 2, 0], [8, 7, 6, 2]])
    lens = torch.tensor([3, 4])
    logits = torch.randn(2, 4, 1, 10)
    ref = F.cross_entropy(
        logits[:, :, 0].reshape(-1, 10), labels.masked_fill(labels == 0, -100).reshape(-1)
    )
    out = multi_token_loss(logits, labels, lens)
    assert float(out.total) == pytest.approx(float(ref), rel=1e-6)
    low = multi_token_loss(logits.bfloat16(), labels, lens)
    assert low.total.dtype == torch.float32
    with pytest.raises(ValueError, match="weights"):
        multi_token_loss(logits, labels, lens, weights=(1.0, 1.0))


def test_ctc_loss_matches_torch_and_survives_impossible_alignment() -> None:
    torch.manual_seed(3)
    logits = torch.randn(2, 6, 5)
    lens = torch.tensor([6, 4])
    targets = torch.tensor([[1, 2, 3], [4, 0, 0]])
    tlens = torch.tensor([3, 1])
    ref = F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), targets, lens, tlens, blank=0)
    assert float(ctc_loss(logits, lens, targets, tlens)) == pytest.approx(float(ref), rel=1e-5)
    # Four tokens cannot align to two frames: that utterance drops out instead of inf.
    bad = ctc_loss(
        logits,
        torch.tensor([2, 4]),
        torch.tensor([[1, 2, 3, 4], [4, 0, 0, 0]]),
        torch.tensor([4, 1]),
    )
    assert math.isfinite(float(bad))


# --- schedule -----------------------------------------------------------------------------------


def test_warmup_cosine_shape() -> None:
    values = [warmup_cosine(s, warmup_steps=10, total_steps=110, min_ratio=0.1) for s in range(130)]
    assert values[0] == pytest.approx(0.1)
    assert values[9] == pytest.approx(1.0)  # peak at the end of warmup
    assert all(a < b for a, b in itertools.pairwise(values[:10]))  # rising
    assert all(a >= b for a, b in itertools.pairwise(values[9:]))  # then falling
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert values[110] == pytest.approx(0.1) and values[129] == pytest.approx(0.1)  # floor


def test_scheduler_drives_optimizer_and_restores() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = build_scheduler(opt, warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    opt2 = torch.optim.AdamW([p], lr=2.0)
    sched2 = build_scheduler(opt2, warmup_steps=4, total_steps=20)
    opt2.load_state_dict(opt.state_dict())  # the current lr travels with the optimizer
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * warmup_cosine(7, 4, 20))
