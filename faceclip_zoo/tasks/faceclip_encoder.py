"""FaceCLIPEncoderModule: contrastive pre-training of the joint ID-text encoder (Eq. 3).

    L = Lc(e_{c->t}, e_I) + Lc(e_{c->r}, e_{r_cls}) + Lc(e_{c->t}, e_{t_cls})

e_{c->t}, e_{c->r}: linear heads over the joint embedding e; e_I: frozen CLIP image
embedding of the target; e_{r_cls}: frozen face-ID embedding of the reference;
e_{t_cls}: frozen (original) CLIP text embedding of the caption. Each term is switched
on by name in `losses` (the paper's L1 = [image], L2 = [image, identity],
L3 = [image, identity, text]). Frozen targets, and the frozen face ViT's outputs that
feed the fusion, are read from the batch when the shards carry cached features
(`python -m faceclip_zoo cache`), and computed otherwise.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from faceclip_zoo.config import CLIPConfig, FaceCLIPConfig
from faceclip_zoo.metrics import nearest_neighbour_accuracy, retrieval_accuracy
from faceclip_zoo.models.clip import build_clip, clip_normalize, text_tower_state
from faceclip_zoo.models.face_vit import FaceViTIdentity, OnnxArcFace
from faceclip_zoo.models.faceclip import FaceCLIPEncoder
from faceclip_zoo.models.io import read_config
from faceclip_zoo.models.weights import empty_weights
from faceclip_zoo.tasks.losses import ContrastiveTerm, LossKind
from faceclip_zoo.tasks.resilience import ResilientTask
from faceclip_zoo.tasks.optim import configure as configure_optimization, default_optimizer
from faceclip_zoo.utils import UserError, load_strict, load_weights_file

log = logging.getLogger(__name__)

LOSS_TERMS = ("image", "identity", "text")


def _load_into(module: nn.Module, path: str, what: str, expect_type: str | None = None,
               pick=None, dtype: torch.dtype | None = None) -> None:
    """Weights from a faceclip_zoo model directory, a safetensors file, or a foreign torch
    pickle (weights only); `pick` selects/renames keys of a foreign state dict."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir() and (p / "config.json").exists() and expect_type is not None:
        model_type, _ = read_config(p)
        if model_type != expect_type:
            raise UserError(f"{what}: {p} holds a {model_type!r} model, expected {expect_type!r}")
    state = load_weights_file(p, what)
    if pick is not None:
        state = pick(state)
    load_strict(module, state, f"{what} {p}", dtype=dtype)


class _TextTowerView(nn.Module):
    """The text-tower parameters of a branch as one module, for a strict load."""

    def __init__(self, encoder: FaceCLIPEncoder):
        super().__init__()
        for name in ("token_embedding", "transformer", "ln_final"):
            self.add_module(name, getattr(encoder, name))
        self.positional_embedding = encoder.positional_embedding
        self.text_projection = encoder.text_projection


def _slice_batch(batch: dict, rows: slice) -> dict:
    """Rows of a collated batch (tensors and lists; scalars such as `skipped` kept)."""
    return {k: v[rows] if isinstance(v, (torch.Tensor, list)) and len(v) == len(batch["caption"]) else v
            for k, v in batch.items()}


class CaptionTokens:
    """Tokenises a collated batch in the DataLoader's workers, as open_clip's data pipeline
    does, so the training step (and the GPU, waiting on it) does not: `input_ids` for the
    branch (the id prompt prefixed on rows with a face) and, unless the shards carry the
    CLIP text target, `clip_input_ids` for the frozen CLIP text tower. Holds tokenizers
    only (picklable)."""

    def __init__(self, branch_tokenizer, clip_tokenizer=None):
        self.branch_tokenizer, self.clip_tokenizer = branch_tokenizer, clip_tokenizer

    def __call__(self, batch: dict) -> dict:
        batch["input_ids"] = self.branch_tokenizer(batch["caption"], batch["has_face"].tolist())
        if self.clip_tokenizer is not None and "clip_text" not in batch:
            batch["clip_input_ids"] = self.clip_tokenizer(batch["caption"])
        return batch


class FaceCLIPEncoderModule(ResilientTask, L.LightningModule):
    """Pre-trains one FaceCLIP branch.

    Args:
        encoder: named FaceCLIPConfig (`faceclip-l14`, `faceclip-bigg14`, `faceclip-tiny`).
        encoder_overrides: overrides of that config (e.g. {"fusion_layers": 2}).
        face_encoder_weights: face-recognition ViT weights (model dir or file).
        clip: named CLIPConfig of the frozen target towers; clip_overrides likewise.
        clip_weights: open_clip CLIP weights (model dir, .safetensors or .bin/.pt).
            Its text tower also initialises the branch's text tower unless
            `text_weights` names another file.
        frozen_dtype: keep the wholly frozen parts (CLIP targets, face ViT, FaceT5's T5
            when no T5 layer trains) in this dtype ("bfloat16"): half their memory; needs
            precision bf16-mixed, whose autocast computes them in bf16 anyway. None: float32.
        init_encoder: an exported encoder directory to start from (overrides the above
            for the branch itself).
        identity_model: the frozen face-ID model for e_{r_cls}: None = the branch's own
            face ViT; "onnx:<path>" = an insightface ArcFace ONNX file.
        losses: which of "image", "identity", "text" to use.
        loss_kind: "clip" (softmax) or "siglip" (sigmoid).
        head_pool: "flatten" (a Linear over all L*W values of e, as the release's heads)
            or "mean" (over tokens).
        unfreeze_text_layers: also train the last N text-tower blocks.
        warmup_steps, lr_schedule: linear warm-up, then constant or cosine to zero.
        val_prompt: the fixed prompt of the identity-retrieval metric.
        micro_batch_size: compute each training batch in micro-batches of this size, all
            of the batch's features serving as negatives (gradient caching): the gradient
            of the whole batch at the memory of one micro-batch. None = in one go.
    """

    def __init__(
        self,
        encoder: str = "faceclip-tiny",
        encoder_overrides: Optional[dict[str, Any]] = None,
        face_encoder_weights: Optional[str] = None,
        clip: str = "clip-tiny",
        clip_overrides: Optional[dict[str, Any]] = None,
        clip_weights: Optional[str] = None,
        frozen_dtype: Optional[Literal["bfloat16", "float16"]] = None,
        text_weights: Optional[str] = None,
        init_encoder: Optional[str] = None,
        identity_model: Optional[str] = None,
        losses: list[str] = ["image", "identity", "text"],  # noqa: B006 (jsonargparse default)
        loss_kind: LossKind = "clip",
        head_pool: Literal["flatten", "mean"] = "flatten",
        unfreeze_text_layers: int = 0,
        optimizer: OptimizerCallable = default_optimizer,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "cosine",
        val_prompt: str = "a photo of a person",
        micro_batch_size: Optional[int] = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        unknown = set(losses) - set(LOSS_TERMS)
        if unknown or not losses:
            raise UserError(f"losses must be a non-empty subset of {LOSS_TERMS}, got {losses}")
        self.loss_names = [t for t in LOSS_TERMS if t in losses]
        self.optimizer_factory = optimizer

        self.encoder_config, self.encoder = self.build_encoder(encoder, encoder_overrides or {})
        self.clip_config = CLIPConfig.from_name(clip, **(clip_overrides or {}))
        with empty_weights(clip_weights is not None):  # the frozen targets: built when their weights are read
            self.clip = build_clip(self.clip_config)
        self.identity_model = None  # built in setup when an external model is named

        w, seq = self.encoder_config.width, self.sequence_length()
        head_in = w * seq if head_pool == "flatten" else w
        self.text_head = nn.Linear(head_in, self.clip_config.embed_dim)
        self.identity_head = nn.Linear(head_in, self.encoder_config.face.id_dim)
        self.loss_terms = nn.ModuleDict({t: ContrastiveTerm(loss_kind) for t in self.loss_names})
        self._freeze()
        self._weights_loaded = False
        self._val_store: dict[str, list] = {}
        self.last_val_embeddings: tuple[torch.Tensor, list[str]] | None = None
        self.skipped_samples = 0

    # ------------------------------------------------------------------ the encoder family
    MODEL_TYPE = "faceclip"

    def build_encoder(self, name: str, overrides: dict[str, Any]):
        cfg = FaceCLIPConfig.from_name(name, **overrides)
        return cfg, FaceCLIPEncoder(cfg, empty_parts=self.empty_encoder_parts())

    def empty_encoder_parts(self) -> set[str]:
        """The encoder's frozen backbones whose weights setup reads: built without memory."""
        hp = self.hparams
        return {"face_encoder"} if hp.get("face_encoder_weights") and not hp.get("init_encoder") else set()

    def frozen_parts(self) -> list[nn.Module]:
        """The parts no gradient reaches, which `frozen_dtype` keeps in that dtype."""
        return [self.clip, self.encoder.face_encoder]

    def frozen_torch_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.hparams.frozen_dtype) if self.hparams.get("frozen_dtype") else None

    def sequence_length(self) -> int:
        return self.encoder_config.text.context_length

    def load_text_weights(self) -> None:
        """The branch's text tower from `text_weights` or the CLIP weights' own text tower."""
        src = self.hparams.text_weights or self.hparams.clip_weights
        if src:
            state = text_tower_state(load_weights_file(src, "text tower weights"))
            load_strict(_TextTowerView(self.encoder), state, f"text tower weights {src}")

    @property
    def clip_tokenizer(self):
        """The tokenizer of the frozen CLIP text tower (the target e_{t_cls})."""
        if getattr(self, "_clip_tokenizer", None) is None:
            from faceclip_zoo.models.clip import build_tokenizer

            self._clip_tokenizer = build_tokenizer(self.clip_config.text)
        return self._clip_tokenizer

    # ------------------------------------------------------------------ setup
    def _freeze(self) -> None:
        self.clip.requires_grad_(False)
        self.clip.eval()
        trainable = set(self.encoder.trainable_parameter_names(self.hparams.unfreeze_text_layers))
        for name, p in self.encoder.named_parameters():
            p.requires_grad_(name in trainable)

    def setup(self, stage: str) -> None:
        for term in self.loss_terms.values():
            term.set_distributed(self.global_rank, self.trainer.world_size if self._trainer else 1)
        first = not self._weights_loaded
        dtype = self.frozen_torch_dtype()
        if dtype is not None and self._trainer is not None and "mixed" not in str(self.trainer.precision):
            raise UserError(f"frozen_dtype {self.hparams.frozen_dtype} needs precision bf16-mixed (or 16-mixed): "
                            f"autocast runs the frozen {self.hparams.frozen_dtype} parts; got {self.trainer.precision}")
        if first:
            self.load_pretrained_weights()
            self.refuse_unloaded()
            if dtype is not None:  # parts built with random weights (no file named) too
                for part in self.frozen_parts():
                    part.to(dtype)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if first and datamodule is not None:
            from faceclip_zoo.cache_fingerprint import check_cached_features

            check_cached_features(self, datamodule)
        if datamodule is not None and hasattr(datamodule, "batch_transform"):
            # Lightning builds the loaders after this hook: their workers tokenise from now on.
            datamodule.batch_transform = self.loader_transform()

    def loader_transform(self) -> "CaptionTokens":
        """What the DataLoader's workers add to each batch: the captions' token ids."""
        clip = self.clip_tokenizer if "text" in self.loss_names else None
        return CaptionTokens(self.encoder.prompt_tokenizer(), clip)

    def load_pretrained_weights(self) -> None:
        hp = self.hparams
        if hp.clip_weights:
            _load_into(self.clip, hp.clip_weights, "CLIP weights", expect_type="clip", dtype=self.frozen_torch_dtype())
        if hp.init_encoder:
            _load_into(self.encoder, hp.init_encoder, "initial encoder", expect_type=self.MODEL_TYPE)
        else:
            if hp.face_encoder_weights:
                _load_into(self.encoder.face_encoder, hp.face_encoder_weights,
                           "face encoder weights", expect_type="face_vit", dtype=self.frozen_torch_dtype())
            self.load_text_weights()
        if hp.identity_model:
            kind, _, path = hp.identity_model.partition(":")
            if kind != "onnx" or not path:
                raise UserError(f"identity_model must be 'onnx:<path>' or empty, got {hp.identity_model!r}")
            self.identity_model = OnnxArcFace(path)
            if self.identity_model.dim != self.encoder_config.face.id_dim:
                self.identity_head = nn.Linear(self.identity_head.in_features, self.identity_model.dim)
        self._weights_loaded = True

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen targets never run in training mode
        return self

    # ------------------------------------------------------------------ forward pieces
    def _pool(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds.flatten(1) if self.hparams.head_pool == "flatten" else embeds.mean(1)

    def joint(self, batch: dict, prompts: list[str] | None = None):
        """Joint embedding of (caption or fixed prompts, reference face)."""
        has_face = batch["has_face"].to(self.device)
        ids = batch.get("input_ids") if prompts is None else None  # tokenised by the loader
        if ids is None:
            ids = self.encoder.tokenize(prompts or batch["caption"], has_face.tolist())
        ids = ids.to(self.device)
        return self.encoder(batch["face"], ids, has_face, face_features=self.cached_face_features(batch))

    # Frozen-model outputs that `python -m faceclip_zoo cache` can store in the shards.
    CACHEABLE = ("arcface", "clip_image", "clip_text", "face_identity", "face_patches")
    _TARGET_FEATURE = {"image": "clip_image", "text": "clip_text", "identity": "arcface"}

    def cached_face_features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The branch's own frozen face ViT outputs (normalised identity, patch tokens)
        when the shards carry them, else None (computed in the forward). Rows without a
        face hold zeros in the batch; the forward would see a black image there, so they
        get the face ViT's output for a black image (one constant)."""
        if "face_identity" not in batch or "face_patches" not in batch:
            return None
        identity = batch["face_identity"].to(self.device)
        patches = batch["face_patches"].to(self.device)
        expected = (self.encoder_config.face.num_patches, self.encoder_config.face.width)
        if tuple(patches.shape[1:]) != expected:
            raise UserError(f"cached face_patches have shape {tuple(patches.shape[1:])}, this encoder's face ViT "
                            f"gives {expected}: the shards were cached for another model; re-run `cache`")
        has_face = batch["has_face"].to(self.device)
        # Unconditionally (asking `has_face.all()` would make the CPU wait for the GPU).
        blank_identity, blank_patches = self._blank_face_features()
        identity = torch.where(has_face[:, None], identity, blank_identity.to(identity.dtype))
        patches = torch.where(has_face[:, None, None], patches, blank_patches.to(patches.dtype))
        return identity, patches

    @torch.no_grad()
    def _blank_face_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        # The face ViT is frozen for the whole run, so its answer to a black image is a
        # constant: computed once per device.
        cached = getattr(self, "_blank_face", None)
        if cached is None or cached[0].device != self.device:
            size = self.encoder_config.face.image_size
            identity, patches = self.encoder.encode_face(torch.zeros(1, 3, size, size, device=self.device))
            self._blank_face = cached = (identity.float(), patches.float())
        return cached

    def cache_sources(self) -> dict[str, tuple[list[nn.Module], str]]:
        """{cacheable feature: (the frozen modules computing it, other settings it depends
        on)}: what `cache` fingerprints (cache_fingerprint.py)."""
        face = ([self.encoder.face_encoder], "")
        arcface = ([], f"onnx:{self.hparams.identity_model}") if self.identity_model is not None else face
        return {"face_identity": face, "face_patches": face, "clip_image": ([self.clip], ""),
                "clip_text": ([self.clip], ""), "arcface": arcface}

    @torch.no_grad()
    def frozen_features(self, batch: dict, names, generator: torch.Generator | None = None
                        ) -> dict[str, torch.Tensor]:
        """The frozen models' outputs for `names` (a subset of CACHEABLE), computed (all
        deterministic: `generator` is unused, for the diffusion modules' interface)."""
        dtype = self.frozen_torch_dtype()
        if dtype is not None and not torch.is_autocast_enabled(self.device.type):
            # outside fit's autocast (`cache`): compute as fit does, or the float32 inputs
            # would meet the frozen parts' half-precision weights
            with torch.autocast(self.device.type, dtype=dtype):
                return {k: v.float() for k, v in self.frozen_features(batch, names, generator).items()}
        out = {}
        if "face_identity" in names or "face_patches" in names:
            has_face = batch["has_face"].to(self.device)
            faces = batch["face"].to(self.device) * has_face[:, None, None, None].to(batch["face"].dtype)
            identity, patches = self.encoder.encode_face(faces)
            out.update({k: v for k, v in (("face_identity", identity), ("face_patches", patches)) if k in names})
        if "clip_image" in names:
            out["clip_image"] = self.clip.encode_image(clip_normalize(batch["image"].to(self.device)))
        if "clip_text" in names:
            ids = batch.get("clip_input_ids")  # tokenised by the loader
            ids = self.clip_tokenizer(batch["caption"]) if ids is None else ids
            out["clip_text"] = self.clip.encode_text(ids.to(self.device))
        if "arcface" in names:
            model = self.identity_model or FaceViTIdentity(self.encoder.face_encoder)
            out["arcface"] = model(batch["face"].to(self.device))
        return out

    @torch.no_grad()
    def targets(self, batch: dict, own_identity: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Frozen targets: cached in the batch when the shards carry them, else computed.
        `own_identity`: the branch's identity vectors of this batch, reused as e_{r_cls}
        when the branch's own (always frozen) face ViT is the identity model: the same
        computation, done once."""
        out = {loss: batch.get(self._TARGET_FEATURE[loss]) for loss in self.loss_names}
        if out.get("identity", 0) is None and own_identity is not None and self.identity_model is None:
            out["identity"] = own_identity.detach()
        missing = [self._TARGET_FEATURE[loss] for loss, v in out.items() if v is None]
        computed = self.frozen_features(batch, missing) if missing else {}
        return {loss: v if v is not None else computed[self._TARGET_FEATURE[loss]] for loss, v in out.items()}

    def head_features(self, batch: dict) -> tuple[dict[str, torch.Tensor], Any]:
        """The trainable path: joint embedding -> the heads the enabled losses use."""
        out = self.joint(batch)
        pooled = self._pool(out.embeds)
        feats = {}
        if {"image", "text"} & set(self.loss_names):
            feats["e_ct"] = self.text_head(pooled)
        if "identity" in self.loss_names:
            feats["e_id"] = self.identity_head(pooled)
        return feats, out

    def losses_from(self, feats: dict, tgt: dict, has_face: torch.Tensor, local: bool) -> dict[str, torch.Tensor]:
        losses = {}
        if "image" in self.loss_names:
            losses["image"] = self.loss_terms["image"](feats["e_ct"], tgt["image"], local=local)
        if "identity" in self.loss_names:
            losses["identity"] = self.loss_terms["identity"](feats["e_id"], tgt["identity"], mask=has_face,
                                                             local=local)
        if "text" in self.loss_names:
            losses["text"] = self.loss_terms["text"](feats["e_ct"], tgt["text"], local=local)
        return losses

    def compute_losses(self, batch: dict) -> tuple[dict[str, torch.Tensor], Any]:
        feats, out = self.head_features(batch)
        tgt = self.targets(batch, own_identity=out.identity)
        local = not self.training  # validation batches are not contrasted across ranks
        losses = self.losses_from(feats, tgt, batch["has_face"], local=local)
        return losses, (out, feats.get("e_ct"), tgt)

    def cached_negative_losses(self, batch: dict, micro: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The losses of the whole batch computed micro-batch by micro-batch, every
        micro-batch's features serving as negatives of all others (gradient caching).

        open_clip does this with one backward per micro-batch (accum_freq); Lightning's
        automatic optimisation runs one backward per step, so this is written here:
        (1) features of all micro-batches without a graph; (2) the loss over them (gathered
        across ranks as usual) and its gradient G with respect to the features; (3) per
        micro-batch, features recomputed under activation checkpointing and the surrogate
        sum(f * G), whose gradient is the micro-batch's share of the full gradient. The
        returned total has the value of the loss and, in backward, the exact gradient of a
        single large batch, holding one micro-batch's activations at a time."""
        from torch.utils.checkpoint import checkpoint

        chunks = [slice(i, i + micro) for i in range(0, len(batch["caption"]), micro)]
        parts = [_slice_batch(batch, c) for c in chunks]
        feats: dict[str, list] = {}
        tgts: dict[str, list] = {}
        with torch.no_grad():
            for part in parts:
                f, out = self.head_features(part)
                for k, v in f.items():
                    feats.setdefault(k, []).append(v)
                for k, v in self.targets(part, own_identity=out.identity).items():
                    tgts.setdefault(k, []).append(v)
        leaves = {k: torch.cat(v).detach().requires_grad_() for k, v in feats.items()}
        tgt = {k: torch.cat(v) for k, v in tgts.items()}
        losses = self.losses_from(leaves, tgt, batch["has_face"], local=False)
        total = sum(losses.values())
        names = list(leaves)
        # retain_graph: Lightning's backward of `total` runs this graph again, for the
        # gradient of the temperatures (and nothing else: the leaves are detached).
        grads = dict(zip(names, torch.autograd.grad(total, [leaves[k] for k in names], retain_graph=True)))
        surrogate = total.new_zeros(())
        for c, part in zip(chunks, parts):
            f = checkpoint(lambda p: self.head_features(p)[0], part, use_reentrant=False)
            surrogate = surrogate + sum((f[k].float() * grads[k][c]).sum() for k in names)
        return losses, total + (surrogate - surrogate.detach())

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        micro = self.hparams.micro_batch_size
        if micro and micro < len(batch["caption"]):
            losses, total = self.cached_negative_losses(batch, micro)
        else:
            losses, _ = self.compute_losses(batch)
            total = sum(losses.values())
        return total, losses

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, losses = self.training_loss(batch)
        self.check_finite(loss, batch, batch_idx)
        bs = len(batch["caption"])
        self.skipped_samples += int(batch.get("skipped", 0))
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in losses.items():
            self.log(f"train/loss_{name}", value, batch_size=bs)
        self.log("train/skipped_samples", float(self.skipped_samples), batch_size=bs)
        self.log("train/face_fraction", batch["has_face"].float().mean(), batch_size=bs)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_store = {"joint": [], "identity": [], "faceid": [], "e_ct": [], "e_img": [],
                           "caption": []}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        bs = len(batch["caption"])
        losses, (out, e_ct, tgt) = self.compute_losses(batch)
        self.log("val/loss", sum(losses.values()), batch_size=bs)
        for name, value in losses.items():
            self.log(f"val/loss_{name}", value, batch_size=bs)
        store = self._val_store
        rows = batch["has_face"].cpu()
        if rows.any():
            fixed = self.joint(batch, [self.hparams.val_prompt] * bs)
            store["joint"].append(fixed.embeds[rows.to(self.device)].flatten(1).float().cpu())
            store["identity"].extend(i for i, r in zip(batch["identity"], rows.tolist()) if r)
            store["faceid"].append(out.identity[rows.to(self.device)].float().cpu())
        img = tgt.get("image")
        if img is None:
            img = self.clip.encode_image(clip_normalize(batch["image"]))
        if e_ct is None:
            e_ct = self.text_head(self._pool(out.embeds))
        store["e_ct"].append(e_ct.float().cpu())
        store["e_img"].append(img.float().cpu())
        store["caption"].extend(batch["caption"])

    def on_validation_epoch_end(self) -> None:
        s = self._val_store
        if s.get("joint"):
            joint = torch.cat(s["joint"])
            self.log("val/identity_top1", nearest_neighbour_accuracy(joint, s["identity"]),
                     prog_bar=True)
            # Reference point: the frozen face-ID model itself on the same references.
            self.log("val/identity_top1_faceid",
                     nearest_neighbour_accuracy(torch.cat(s["faceid"]), s["identity"]))
            self.last_val_embeddings = (joint, list(s["identity"]))
        if s.get("e_ct"):
            self.log("val/text_top1", retrieval_accuracy(torch.cat(s["e_ct"]), torch.cat(s["e_img"]),
                                                         s["caption"]))
        self._val_store = {}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        return configure_optimization(self, self.optimizer_factory, self.hparams.warmup_steps,
                                      self.hparams.lr_schedule)

    # ------------------------------------------------------------------ export
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # What `export` needs to rebuild the branch from the checkpoint alone.
        checkpoint["faceclip_zoo"] = {
            "exports": {"encoder": {"model_type": self.MODEL_TYPE, "prefix": "encoder.",
                                    "config": self.encoder_config.to_dict()}},
        }

