import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from faceclip_zoo.tasks.losses import ContrastiveTerm


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_masked_form_equals_open_clip_when_nothing_is_masked(kind):
    torch.manual_seed(0)
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    term = ContrastiveTerm(kind)
    masked = term(a, b, mask=torch.ones(8, dtype=torch.bool))
    an, bn = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    if kind == "clip":
        expected = ClipLoss()(an, bn, term.scale())
    else:
        expected = SigLipLoss()(an, bn, term.scale(), term.logit_bias)
    torch.testing.assert_close(masked, expected)
    torch.testing.assert_close(term(a, b), expected)  # unmasked path is open_clip's own


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_masked_rows_do_not_influence_the_loss(kind):
    torch.manual_seed(0)
    a, b = torch.randn(6, 16), torch.randn(6, 16)
    mask = torch.tensor([True, False, True, True, False, True])
    term = ContrastiveTerm(kind)
    loss = term(a, b, mask)
    a2, b2 = a.clone(), b.clone()
    a2[~mask] = torch.randn(2, 16) * 5
    b2[~mask] = torch.randn(2, 16) * 5
    torch.testing.assert_close(term(a2, b2, mask), loss)
    # and equals the loss on the valid rows alone
    torch.testing.assert_close(term(a[mask], b[mask], torch.ones(4, dtype=torch.bool)), loss)
    assert torch.isfinite(loss)


def test_all_rows_masked_gives_zero_not_nan():
    term = ContrastiveTerm("clip")
    loss = term(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0


def test_contrastive_term_learns_to_align():
    torch.manual_seed(0)
    target = torch.randn(16, 8)
    pred = torch.nn.Parameter(torch.randn(16, 8))
    term = ContrastiveTerm("clip")
    opt = torch.optim.Adam([pred, *term.parameters()], lr=0.05)
    first = term(pred, target).item()
    for _ in range(100):
        loss = term(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
