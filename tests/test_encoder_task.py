"""FaceCLIPEncoderModule on tiny configs: losses, freezing, cached targets."""

import pytest
import torch

from faceclip_zoo.tasks import FaceCLIPEncoderModule
from faceclip_zoo.utils import UserError


def batch(n=4, faces=(True, True, False, True)):
    torch.manual_seed(0)
    return {"image": torch.rand(n, 3, 64, 64), "face": torch.rand(n, 3, 112, 112),
            "has_face": torch.tensor(faces), "caption": [f"a photo number {i}" for i in range(n)],
            "identity": ["a", "b", "", "a"], "key": [str(i) for i in range(n)], "skipped": 0}


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return FaceCLIPEncoderModule(encoder="faceclip-tiny", clip="clip-tiny")


def test_loss_terms_switch_from_arguments():
    for losses in (["image"], ["image", "identity"], ["image", "identity", "text"]):
        m = FaceCLIPEncoderModule(losses=losses)
        values, _ = m.compute_losses(batch())
        assert sorted(values) == sorted(losses) and all(torch.isfinite(v) for v in values.values())
    with pytest.raises(UserError, match="subset"):
        FaceCLIPEncoderModule(losses=["image", "style"])


def test_only_fusion_projections_and_heads_train(module):
    values, _ = module.compute_losses(batch())
    sum(values.values()).backward()
    # graph participation (DDP's criterion); face_pos_proj's gradient is exactly zero at
    # init only because the deformable layers' offset/weight matrices start at zero
    trained = {n for n, p in module.named_parameters() if p.grad is not None}
    assert trained, "nothing received a gradient"
    frozen_prefixes = ("clip.", "encoder.face_encoder.", "encoder.transformer.", "encoder.token_embedding",
                       "encoder.ln_final", "encoder.text_projection", "encoder.logit_")
    assert not [n for n in trained if n.startswith(frozen_prefixes)]
    for expected in ("encoder.fuser.fusion_layers.0.gamma_l", "encoder.proj1.weight", "text_head.weight",
                     "identity_head.weight", "encoder.face_patch_proj.weight", "loss_terms.identity.logit_scale"):
        assert expected in trained
    assert {n for n, p in module.named_parameters() if p.requires_grad} == trained
    module.zero_grad()


def test_unfreezing_text_layers():
    m = FaceCLIPEncoderModule(unfreeze_text_layers=1)
    names = {n for n, p in m.encoder.named_parameters() if p.requires_grad}
    assert any(n.startswith("transformer.resblocks.1.") for n in names)
    assert not any(n.startswith("transformer.resblocks.0.") for n in names)


def test_cached_features_replace_frozen_forwards(module):
    b = batch()
    b["clip_image"] = torch.randn(4, 64)
    b["clip_text"] = torch.randn(4, 64)
    b["arcface"] = torch.randn(4, 64)
    tgt = module.targets(b)
    for key, name in (("image", "clip_image"), ("text", "clip_text"), ("identity", "arcface")):
        assert tgt[key] is b[name]
    computed = module.targets(batch())
    assert computed["image"].shape == (4, 64) and not torch.equal(computed["image"], b["clip_image"])


def test_identity_loss_ignores_rows_without_face(module):
    b = batch()
    values, _ = module.compute_losses(b)
    b2 = dict(b)
    b2["face"] = b["face"].clone()
    b2["face"][2] = torch.rand(3, 112, 112)  # the face-less row's pixels are never looked at
    values2, _ = module.compute_losses(b2)
    torch.testing.assert_close(values["identity"], values2["identity"])


def test_reused_identity_equals_a_separate_face_id_forward(module):
    b = batch()
    out = module.joint(b)
    reused = module.targets(b, own_identity=out.identity)["identity"]
    separate = module.targets(b)["identity"]
    rows = b["has_face"]  # face-less rows are masked out of the identity loss
    torch.testing.assert_close(torch.nn.functional.normalize(separate, dim=-1)[rows], reused[rows])


def test_loader_tokenises_and_the_step_reads_its_ids(module):
    """The DataLoader's workers tokenise (CaptionTokens, picklable: no model inside); the
    step then uses those ids, not the captions."""
    import pickle

    transform = pickle.loads(pickle.dumps(module.loader_transform()))
    b = transform(batch())
    assert torch.equal(b["input_ids"], module.encoder.tokenize(b["caption"], b["has_face"].tolist()))
    prefix = module.encoder.tokenize(["x"], [True])[0, 1].item()  # first token of the id prompt
    assert b["input_ids"][:, 1].eq(prefix).tolist() == b["has_face"].tolist()
    assert torch.equal(b["clip_input_ids"], module.clip_tokenizer(b["caption"]))
    expected, _ = module.compute_losses(batch())
    b["caption"] = ["unrelated words"] * 4  # ignored now that the ids are there
    got, _ = module.compute_losses(b)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value)
    assert "clip_input_ids" not in transform(dict(batch(), clip_text=torch.zeros(4, 64)))  # cached target


def test_fit_hands_the_tokenisation_to_the_loader(tiny_shards):
    import lightning as L

    from faceclip_zoo.data import ShardDataModule

    seen = []

    class Keys(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, batch_idx):
            seen.append(set(b))

    dm = ShardDataModule(train=str(tiny_shards / "train"), batch_size=4, num_workers=1, image_size=64)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Keys()], accelerator="cpu")
    trainer.fit(FaceCLIPEncoderModule(encoder="faceclip-tiny", clip="clip-tiny"), datamodule=dm)
    assert seen and {"input_ids", "clip_input_ids"} <= seen[0]
