"""The oracle of the identity diagnosis: the same SDXL UNet, trained the same way, but
conditioned on the caption alone (the branches' embedding with no face) plus the frozen
face-ID vector of the reference as one extra condition token (a trained linear map). Its
generated-image identity is what this UNet can learn in the budget when identity is handed
to it directly: an upper bound for the joint embedding.

    python -m faceclip_zoo fit --config recipes/quickstart/oracle-sdxl.yaml
    python -m faceclip_zoo evaluate --pipeline runs/quickstart/oracle-sdxl/version_0/checkpoints/last.ckpt \\
        --benchmark synthetic --out runs/eval/oracle

A diagnostic, not a model to ship: it has no export (its pipeline exists in-process only).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from faceclip_zoo.models.face_vit import FaceViT, FaceViTIdentity
from faceclip_zoo.models.io import read_config
from faceclip_zoo.models.sdxl_condition import SDXLCondition
from faceclip_zoo.pipelines.sdxl import FaceCLIPSDXLPipeline
from faceclip_zoo.tasks.sdxl import SDXLJointModule
from faceclip_zoo.utils import UserError, load_strict, load_weights_file


class IdentityTokenCondition(nn.Module):
    """(caption embedding without a face, [identity token]) in SDXLCondition's interface."""

    def __init__(self, base: SDXLCondition, face_id: FaceViTIdentity):
        super().__init__()
        self.base, self.face_id = base, face_id
        self.face_id.requires_grad_(False)
        self.proj = nn.Linear(face_id.dim, base.embed_dim)

    def __getattr__(self, name):  # embed_dim, pooled_dim, face_size, branches, branch_l, branch_g
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def forward(self, prompts, face_images, has_face, face_features=None):
        b = len(prompts)
        no_face = torch.zeros(b, dtype=torch.bool, device=face_images.device)
        with torch.no_grad():
            embeds, pooled = self.base(list(prompts), torch.zeros_like(face_images), no_face)
            identity = F.normalize(self.face_id(face_images).float(), dim=-1)
            identity = identity * has_face.to(identity.device)[:, None]
        token = self.proj(identity.to(self.proj.weight.dtype))[:, None]
        return torch.cat([embeds, token.to(embeds.dtype)], dim=1), pooled

    @torch.no_grad()
    def unconditional(self, prompts, device, dtype=None):
        s = self.base.face_size
        return self(list(prompts), torch.zeros(len(prompts), 3, s, s, device=device, dtype=dtype),
                    torch.zeros(len(prompts), dtype=torch.bool, device=device))


class OraclePipeline(FaceCLIPSDXLPipeline):
    """FaceCLIPSDXLPipeline whose condition is the oracle's (in-process only)."""

    oracle_condition: IdentityTokenCondition | None = None

    @property
    def condition(self):
        return self.oracle_condition


class OracleSDXLModule(SDXLJointModule):
    """SDXLJointModule with the oracle condition; every other argument is SDXLJointModule's.

    Args:
        face_id: the frozen face-ID ViT folder whose vector is the identity token.
    """

    def __init__(self, face_id: str = "checkpoints/synthetic/face-vit", **kwargs):
        if kwargs.get("train_encoders"):
            raise UserError("the oracle keeps the branches frozen (train_encoders: false)")
        super().__init__(**kwargs)
        found, cfg = read_config(face_id)
        if found != "face_vit":
            raise UserError(f"{face_id} holds a {found!r} model; the oracle needs a face_vit folder")
        # eval from the start: Lightning keeps each submodule's mode, and a face ViT left in
        # train mode would update its BatchNorm statistics on the training batches.
        self.condition = IdentityTokenCondition(self.condition, FaceViTIdentity(FaceViT(cfg)).eval())

    def load_pretrained_weights(self) -> None:
        oracle, self.condition = self.condition, self.condition.base  # the branches load as in SDXL
        try:
            super().load_pretrained_weights()
        finally:
            self.condition = oracle
        path = f"{self.hparams.face_id}/model.safetensors"
        load_strict(self.condition.face_id.vit, load_weights_file(path, "oracle face_id"), path)
        # The token starts as loud as the caption's tokens: a default-initialised map gives a
        # token of norm ~1 among tokens of norm ~11, which cross-attention then never looks
        # at (measured: the oracle ignored it, paired Face Sim gain 0.000 +- 0.001).
        with torch.no_grad():
            embeds, _ = self.condition.base.unconditional(["a photo of a person"], self.device)
            norm = embeds.float().norm(dim=-1).mean().item()
            proj = self.condition.proj
            torch.nn.init.normal_(proj.weight, std=norm / proj.in_features ** 0.5)
            torch.nn.init.zeros_(proj.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.condition.face_id.eval()
        return self

    def embed(self, batch: dict, drop: torch.Tensor, no_face: torch.Tensor | None = None):
        has_face = batch["has_face"].to(self.device) & ~drop
        if no_face is not None:
            has_face = has_face & ~no_face
        captions = [("" if d else c) for c, d in zip(batch["caption"], drop.tolist())]
        return self.condition(captions, batch["face"].to(self.device), has_face)

    def null_condition(self, batch_size: int):
        embeds, pooled = self.condition.unconditional([""], self.device)
        return embeds.expand(batch_size, -1, -1), pooled.expand(batch_size, -1)

    def pipeline(self, use_ema: bool = True) -> OraclePipeline:
        from faceclip_zoo.pipelines.components import FaceCLIPEncoderModel
        from faceclip_zoo.pipelines.components import build_scheduler

        unet = self.unet
        if use_ema and self.ema is not None:
            unet = copy.deepcopy(self.unet)
            self.ema.copy_to([p for p in unet.parameters() if p.requires_grad])  # the EMA's parameters
        pipe = OraclePipeline(vae=self.vae, face_encoder=FaceCLIPEncoderModel.from_encoder(self.condition.branch_l),
                              face_encoder_2=FaceCLIPEncoderModel.from_encoder(self.condition.branch_g),
                              unet=unet, scheduler=build_scheduler(self.scheduler_config))
        pipe.oracle_condition = self.condition
        return pipe

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["faceclip_zoo"]["exports"] = {}  # a diagnostic: nothing to export
