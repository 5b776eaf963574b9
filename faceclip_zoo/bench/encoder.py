"""Encoder pre-training and the encoder forward against their peers.

- FaceCLIPEncoderModule's Lightning step (all three losses, frozen targets computed)
  against open_clip's own CLIP training step: its CLIP model with the same text tower,
  ClipLoss, AdamW, same batch, captions tokenised beforehand on both sides (by the loader's
  workers in training). Not equal work: open_clip trains both towers; we train the fusion
  with a frozen face ViT and run the frozen CLIP towers for the targets.
- The same step with the frozen features cached in the batch (what `cache` stores in the
  shards: the CLIP targets and the frozen face ViT's identity and patch tokens) against
  computing them every step. What stays is the trainable path: the text tower's forward
  and backward (the gradient reaches proj1 through the injected id token), the fusion,
  the heads and the optimizer.
- FaceCLIPEncoder's forward against a straightforward statement of the release's
  computation (faceclip_zoo.bench.release_reference) on the same weights.
"""

from __future__ import annotations

import torch

from faceclip_zoo.bench.context import Context
from faceclip_zoo.bench.harness import (
    Measurement, Row, autocast, compare, compare_lightning, guarded, lightning_block, optimizer_step, release_memory,
)


def _batch(module, ctx: Context, b: int) -> dict:
    g = torch.Generator().manual_seed(0)
    face = module.encoder_config.face.image_size
    img = module.clip_config.vision.image_size
    return {"image": torch.rand(b, 3, img, img, generator=g).to(ctx.device),
            "face": torch.rand(b, 3, face, face, generator=g).to(ctx.device),
            "has_face": torch.ones(b, dtype=torch.bool, device=ctx.device),
            "caption": ctx.captions(b), "identity": [f"id{i}" for i in range(b)],
            "key": [f"k{i}" for i in range(b)], "skipped": 0}


def _as_loaded(module, batch: dict, device) -> dict:
    """The batch as the training loader hands it over: captions tokenised by its workers
    (as open_clip's pipeline does, and as the open_clip peer's tokens are precomputed)."""
    out = module.loader_transform()(dict(batch))
    return {k: v.to(device) if k.endswith("input_ids") else v for k, v in out.items()}


def _open_clip_step(ctx: Context, clip_cfg, batch: dict):
    """open_clip's training step (its train_one_epoch without the data loading)."""
    from open_clip.loss import ClipLoss

    from faceclip_zoo.models.clip import build_clip, build_tokenizer, clip_normalize

    with ctx.build():
        model = build_clip(clip_cfg).to(ctx.device).train()
    tokens = build_tokenizer(clip_cfg.text)(batch["caption"]).to(ctx.device)
    images = clip_normalize(batch["image"])
    loss_fn = ClipLoss()

    def make():
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)

        def step():
            with autocast(ctx.device, ctx.precision):
                image_features, text_features, scale = model(images, tokens)
                loss = loss_fn(image_features, text_features, scale)
            optimizer_step(loss, opt)
        return step
    return model, make


def contrastive_rows(ctx: Context) -> list[Row]:
    from faceclip_zoo.config import CLIPConfig
    from faceclip_zoo.tasks.faceclip_encoder import FaceCLIPEncoderModule

    s = ctx.size
    with ctx.build():
        module = FaceCLIPEncoderModule(encoder=s.encoder, encoder_overrides=s.encoder_overrides, clip=s.clip,
                                       clip_overrides=s.clip_overrides).to(ctx.device)
    batch = _as_loaded(module, _batch(module, ctx, s.encoder_batch), ctx.device)
    # the peer: open_clip's CLIP with our branch's text tower
    peer_cfg = CLIPConfig.from_name(s.clip, **s.clip_overrides)
    peer_cfg.text = module.encoder_config.text
    peer_model, peer = _open_clip_step(ctx, peer_cfg, batch)
    ours, theirs = compare_lightning(module, batch, peer, ctx.device, ctx.precision, **ctx.compare_kwargs())
    del peer_model, peer
    release_memory(ctx.device)
    rows = [Row(f"encoder step: FaceCLIPEncoderModule vs open_clip CLIP + ClipLoss, batch {s.encoder_batch}",
                ours.median, theirs.median, ours_mem=ours.peak, peer_mem=theirs.peak,
                note="unequal work: open_clip trains both towers, ours the fusion + computed frozen targets")]

    # cached frozen features (everything `python -m faceclip_zoo cache` stores for this
    # module: the CLIP targets, the face-ID target, the face ViT's outputs) vs computed
    module.eval()
    with torch.no_grad(), autocast(ctx.device, ctx.precision):
        cached = {**batch, **{k: v.float() for k, v in module.frozen_features(batch, module.CACHEABLE).items()}}
    module.train()
    with_cache, without = _two_lightning(module, cached, batch, ctx)
    rows.append(Row(f"encoder step: frozen features cached vs computed each step, batch {s.encoder_batch}",
                    with_cache.median, without.median, ours_mem=with_cache.peak, peer_mem=without.peak,
                    goal="<= 0.50 (>= 2x)", note="cached: CLIP image/text targets and the face ViT's outputs"))
    del module
    release_memory(ctx.device)
    return rows


def _two_lightning(module, batch_a: dict, batch_b: dict, ctx: Context):
    """Two batches through the same Lightning step, alternating blocks."""
    a, b = Measurement(), Measurement()
    for _ in range(ctx.rounds):
        lightning_block(module, batch_a, ctx.device, ctx.precision, ctx.warmup, ctx.repeats, a)
        lightning_block(module, batch_b, ctx.device, ctx.precision, ctx.warmup, ctx.repeats, b)
    return a, b


def encoder_forward_row(ctx: Context) -> Row:
    """Our FaceCLIPEncoder forward vs the release's computation, same weights, same inputs
    (tokenisation included in both), in the precision inference runs in."""
    from faceclip_zoo.bench.release_reference import official_state_from_ours, release_branch_forward
    from faceclip_zoo.config import FaceCLIPConfig
    from faceclip_zoo.models.clip import build_text_tower, build_tokenizer
    from faceclip_zoo.models.faceclip import FaceCLIPEncoder

    cfg = FaceCLIPConfig.from_name(ctx.size.encoder, **ctx.size.encoder_overrides)
    with ctx.build():
        ours = FaceCLIPEncoder(cfg).to(ctx.device, ctx.dtype).eval()
        tower = build_text_tower(cfg.text).transformer.to(ctx.device, ctx.dtype).eval()
    sd = official_state_from_ours({k: v for k, v in ours.state_dict().items()}, cfg.width)
    tower.load_state_dict({k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")})
    tok = build_tokenizer(cfg.text)
    b = 4  # an inference batch
    images = torch.rand(b, 3, 448, 448, generator=torch.Generator().manual_seed(0)).to(ctx.device, ctx.dtype)
    texts = ctx.captions(b)
    flags = [True] * b
    has_face = torch.ones(b, dtype=torch.bool, device=ctx.device)

    def mine():
        return ours(images, ours.tokenize(texts, flags).to(ctx.device), has_face).embeds

    def release():
        return release_branch_forward(sd, cfg, tower, _on(tok, ctx.device), images, flags, texts)[0]

    with torch.no_grad():
        err = (mine().float() - release().float()).abs().max().item()
        # a forward is milliseconds, launch-bound on a GPU: many repeats steady the median
        a, r = compare(lambda: torch.no_grad()(mine), lambda: torch.no_grad()(release), ctx.device,
                       **dict(ctx.compare_kwargs(), repeats=max(20, ctx.repeats)))
    del ours, tower, sd
    release_memory(ctx.device)
    return Row(f"encoder forward: FaceCLIPEncoder vs the release's computation, batch {b}, {cfg.name}",
               a.median, r.median, unit="batch", ours_mem=a.peak, peer_mem=r.peak, goal="<= 1.05",
               note=f"same weights; max |diff| {err:.1e}")


def _on(tokenizer, device):
    """The release's tokenizer call, with its ids on the device."""
    return lambda texts: tokenizer(texts).to(device)


def run(ctx: Context) -> list[Row]:
    return (guarded("encoder step vs open_clip; cached vs computed", contrastive_rows, ctx)
            + guarded("encoder forward vs the release's computation", encoder_forward_row, ctx))
