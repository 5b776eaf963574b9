"""AnyPrecisionAdamW: AdamW in fp32; in bf16 its compensation keeps updates far below a
bf16 ulp that round-to-nearest loses."""

import pytest
import torch

from faceclip_zoo.tasks.optim import AnyPrecisionAdamW


def test_fp32_matches_torch_adamw():
    torch.manual_seed(0)
    w = torch.randn(5, 7)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = AnyPrecisionAdamW([a], lr=1e-2, weight_decay=0.1, state_dtype="float32")
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(20):
        g = torch.randn(5, 7)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _train_bf16(compensation, steps=300, lr=1e-4):
    """Constant gradient: Adam moves every weight by ~lr per step, 1/80 of a bf16 ulp at 1.0."""
    p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = AnyPrecisionAdamW([p], lr=lr, weight_decay=0.0, compensation=compensation)
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()
    return p.float()


def test_bf16_compensation_keeps_small_updates():
    target = 1.0 - 300 * 1e-4  # what fp32 weights would reach
    nearest = _train_bf16("none")
    assert torch.all(nearest == 1.0)  # every update rounded away
    kahan = _train_bf16("kahan")
    assert (kahan - target).abs().max() < 2 ** -8  # within one bf16 ulp below 1.0
    stochastic = _train_bf16("stochastic")
    assert abs(stochastic.mean().item() - target) < 1e-3  # unbiased on average
    assert stochastic.unique().numel() > 1  # and genuinely random per element


def test_state_dtype_and_bad_arguments():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = AnyPrecisionAdamW([p], state_dtype="bfloat16")
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16 and opt.state[p]["compensation"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="compensation"):
        AnyPrecisionAdamW([p], compensation="exact")
    with pytest.raises(ValueError, match="state_dtype"):
        AnyPrecisionAdamW([p], state_dtype="int8")


def test_bf16_true_fit_with_any_precision_adamw(tmp_path, tiny_shards):
    import yaml

    import test_cli
    from faceclip_zoo.cli import main

    path = test_cli.tiny_recipe(tmp_path, tiny_shards)
    recipe = yaml.safe_load(path.read_text())
    recipe["trainer"].update(precision="bf16-true", max_steps=4, val_check_interval=4)
    recipe["model"]["init_args"]["optimizer"] = {
        "class_path": "faceclip_zoo.tasks.optim.AnyPrecisionAdamW",
        "init_args": {"lr": 1e-3, "compensation": "kahan", "state_dtype": "bfloat16"}}
    recipe["data"]["init_args"]["train"] = str(tiny_shards / "train")
    path.write_text(yaml.safe_dump(recipe))
    assert main(["fit", "--config", str(path)]) == 0
    ckpt = torch.load(tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert ckpt["state_dict"]["text_head.weight"].dtype == torch.bfloat16
    states = list(ckpt["optimizer_states"][0]["state"].values())
    assert states and all(s["exp_avg"].dtype == torch.bfloat16 for s in states)
    assert any("compensation" in s and s["compensation"].abs().sum() > 0 for s in states)


def test_lr_scales_raise_the_lr_of_the_named_parameters_only():
    import lightning as L

    from faceclip_zoo.tasks.optim import configure
    from faceclip_zoo.utils import UserError

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.attn1, self.attn2 = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
            self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)

    net = Net()
    factory = lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)  # noqa: E731
    plain = configure(net, factory, 0, "constant")["optimizer"]
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in plain.param_groups] == [
        (1e-3, 0.1, 1 + 1), (1e-3, 0.0, 1 + 1)]  # two weights; two biases, no decay
    scaled = configure(net, factory, 10, "cosine", {"attn2": 4.0})
    groups = scaled["optimizer"].param_groups
    lr_of = {id(p): (g["initial_lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert lr_of[id(net.attn1.weight)] == (1e-3, 0.1) and lr_of[id(net.attn1.bias)] == (1e-3, 0.0)
    assert lr_of[id(net.attn2.weight)] == (4e-3, 0.1) and lr_of[id(net.attn2.bias)] == (4e-3, 0.0)
    assert id(net.frozen.weight) not in lr_of
    # the schedule (warm-up here) scales each group from its own lr
    assert scaled["lr_scheduler"]["scheduler"].base_lrs == [g["initial_lr"] for g in groups]
    assert groups[-1]["lr"] == pytest.approx(4e-3 / 10)
    with pytest.raises(UserError, match="'attn3'"):
        configure(net, factory, 0, "constant", {"attn3": 2.0})
