"""MuonAdamW: torch's Muon on matrices, torch's AdamW on the rest, convolution filters as
flattened matrices, and state that resumes exactly."""

import pytest
import torch

from faceclip_zoo.tasks.muon import MuonAdamW, orthogonalize


def _grads(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def test_matrices_follow_torch_muon_and_vectors_torch_adamw():
    torch.manual_seed(0)
    w, b = torch.randn(8, 12), torch.randn(5)
    ours = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    muon, adamw = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    opt = MuonAdamW(ours, lr=1e-2, weight_decay=0.1)
    ref_muon = torch.optim.Muon([muon], lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ref_adamw = torch.optim.AdamW([adamw], lr=1e-2, weight_decay=0.1)
    for gw, gb in _grads([(8, 12), (5,)], 10):
        ours[0].grad, ours[1].grad, muon.grad, adamw.grad = gw, gb, gw.clone(), gb.clone()
        opt.step()
        ref_muon.step()
        ref_adamw.step()
    torch.testing.assert_close(ours[1], adamw, atol=1e-6, rtol=1e-5)
    # torch's Newton-Schulz runs in bf16, ours in fp32: the same update up to bf16 rounding
    assert (ours[0] - muon).abs().max() < 1e-3 * muon.abs().max()
    assert (ours[0] - w).abs().max() > 0.05  # and it moved


def test_a_conv_filter_is_trained_as_its_flattened_matrix():
    torch.manual_seed(0)
    k = torch.randn(6, 3, 3, 3)
    conv, flat = torch.nn.Parameter(k.clone()), torch.nn.Parameter(k.reshape(6, 27).clone())
    opt_conv, opt_flat = MuonAdamW([conv], lr=1e-2), MuonAdamW([flat], lr=1e-2)
    for (g,) in _grads([(6, 3, 3, 3)], 5):
        conv.grad, flat.grad = g, g.reshape(6, 27).clone()
        opt_conv.step()
        opt_flat.step()
    torch.testing.assert_close(conv.reshape(6, 27), flat)


def test_orthogonalize_batches_and_flattens_the_spectrum():
    g = torch.randn(3, 16, 40) * torch.tensor([1.0, 100.0, 0.01]).view(3, 1, 1)
    tall = torch.randn(2, 40, 16)
    for x in (g, tall):
        s = torch.linalg.svdvals(orthogonalize(x))
        assert s.min() > 0.5 and s.max() < 1.5, s  # every direction moves at about the same rate
        for i in range(len(x)):  # batched = one matrix at a time
            torch.testing.assert_close(orthogonalize(x[i:i + 1]), orthogonalize(x)[i:i + 1])


def test_state_resumes_exactly():
    torch.manual_seed(0)
    init = [torch.randn(4, 6), torch.randn(4, 2, 3, 3), torch.randn(4)]
    grads = _grads([t.shape for t in init], 6, seed=1)

    def run(split):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        opt = MuonAdamW(ps, lr=1e-2, weight_decay=0.1)
        for i, gs in enumerate(grads):
            if i == split:  # a new process: fresh parameters and optimizer from the saved state
                state = {"params": [p.detach().clone() for p in ps], "opt": opt.state_dict()}
                ps = [torch.nn.Parameter(t) for t in state["params"]]
                opt = MuonAdamW(ps, lr=1e-2, weight_decay=0.1)
                opt.load_state_dict(state["opt"])
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        return ps

    for a, b in zip(run(split=None), run(split=3)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bad_momentum():
    with pytest.raises(ValueError, match="momentum"):
        MuonAdamW([torch.nn.Parameter(torch.ones(2, 2))], momentum=1.0)
