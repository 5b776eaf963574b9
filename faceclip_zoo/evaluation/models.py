"""The models evaluation scores with, each named by one string and read from local files.

Face-ID (Face Sim):
    onnx:<file>        an insightface ArcFace ONNX model (e.g. antelopev2/glintr100.onnx, w600k_r50.onnx)
    dlib               dlib's ResNet face recogniser (dlib-bin + face_recognition_models from PyPI: the
                       library and its models, offline; dlib: Boost licence, the models: public domain /
                       CC0): a judge of another architecture and training set than ArcFace;
                       dlib:<folder> reads the two .dat files from a folder instead
    face-vit:<dir>     a faceclip_zoo face_vit model directory (e.g. checkpoints/synthetic/face-vit)
    encoder:<dir>      the face ViT inside a faceclip_zoo encoder directory (FaceCLIP or FaceT5)
CLIP (CLIP-T, zero-shot, FID on CLIP features):
    open_clip:<arch>:<weights>   open_clip.create_model(arch, pretrained=<local file>)
    transformers:<dir>           a transformers CLIPModel folder (config, weights, tokenizer, processor)
    zoo:<dir>                    a faceclip_zoo clip model directory (an open_clip CLIP)
Face locators (where the face of an image is):
    detect             MTCNN, or insightface SCRFD from a local model pack; largest face, ArcFace crop
    synthetic-scene    the synthetic renderer's known face position (quickstart scenes;
                       synthetic-scene:<scene_scale> for another framing, default 0.8)
    aligned            the image is an aligned face crop already
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from faceclip_zoo.utils import UserError, require_file


def _split(spec: str, what: str, kinds: Sequence[str]) -> tuple[str, str]:
    kind, _, rest = (spec or "").partition(":")
    if kind not in kinds or not rest:
        raise UserError(f"{what} must be one of {', '.join(k + ':<...>' for k in kinds)}; got {spec!r}")
    return kind, rest


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL -> float [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


# ------------------------------------------------------------------ face-ID
def load_face_id(spec: str) -> nn.Module:
    """A face-ID model: aligned crops [B, 3, H, W] in [0, 1] -> identity vectors [B, D]."""
    from faceclip_zoo.models.face_vit import FaceViTIdentity, OnnxArcFace
    from faceclip_zoo.models.io import load_model_dir, read_config

    if spec == "dlib" or (spec or "").startswith("dlib:"):
        return DlibFaceRecognition(spec.partition(":")[2] or None)
    kind, path = _split(spec, "face_sim.model", ("onnx", "face-vit", "encoder", "dlib"))
    if kind == "onnx":
        return OnnxArcFace(path)
    require_file(path, "face-ID model directory")
    if kind == "face-vit":
        return FaceViTIdentity(load_model_dir(path, expect="face_vit")).eval()
    model_type, _ = read_config(path)
    if model_type not in ("faceclip", "facet5"):
        raise UserError(f"face_sim.model encoder:{path} holds a {model_type!r} model, expected an encoder")
    return FaceViTIdentity(load_model_dir(path).face_encoder).eval()


class DlibFaceRecognition(nn.Module):
    """dlib's face recogniser (a ResNet trained with a metric loss on ~3 M faces; 128-d
    descriptors, same person below Euclidean distance 0.6) on our aligned crops. dlib aligns
    a face itself, from its own 5-point landmarks: on an ArcFace-aligned crop (padded a
    quarter on each side) its shape predictor runs inside the box dlib's detector draws on
    such crops (template units (15, 32)-(95, 112), measured on aligned portraits), and
    compute_face_descriptor cuts its own chip from there. Vectors come back L2-normalised."""

    BOX = (15, 32, 95, 112)  # in ArcFace 112-template units

    def __init__(self, models: str | None = None):
        super().__init__()
        import importlib.util
        import os

        try:
            import dlib
        except ImportError:
            raise UserError('face_sim.model dlib needs dlib: pip install -e ".[judge]" (dlib-bin, '
                            "face_recognition_models)") from None
        if models is None:  # the package's data files, without its pkg_resources-based __init__
            found = importlib.util.find_spec("face_recognition_models")
            if found is None:
                raise UserError('face_sim.model dlib needs its models: pip install -e ".[judge]" '
                                "(face_recognition_models), or name a folder: dlib:<folder>")
            models = os.path.join(found.submodule_search_locations[0], "models")
        folder = Path(models)
        self.predictor = dlib.shape_predictor(str(require_file(folder / "shape_predictor_5_face_landmarks.dat",
                                                               "dlib landmark model")))
        self.model = dlib.face_recognition_model_v1(str(require_file(
            folder / "dlib_face_recognition_resnet_model_v1.dat", "dlib face recognition model")))
        self.dim = 128
        self._dlib = dlib

    @torch.no_grad()
    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        out = []
        for crop in crops:
            size = crop.shape[-1]
            rgb = (crop.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            pad = size // 4
            rgb = np.ascontiguousarray(np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="edge"))
            k = size / 112
            box = self._dlib.rectangle(*(int(pad + v * k) for v in self.BOX))
            shape = self.predictor(rgb, box)
            out.append(torch.tensor(list(self.model.compute_face_descriptor(rgb, shape)), dtype=torch.float32))
        return F.normalize(torch.stack(out), dim=-1)


class FaceLocator:
    """image -> its aligned face crop [3, size, size] in [0, 1], or None when there is no face."""

    MODES = ("detect", "synthetic-scene", "aligned")

    def __init__(self, mode: str = "detect", detector: str = "auto", detector_model_dir: str | None = None,
                 size: int = 112):
        mode, _, arg = mode.partition(":")
        if mode not in self.MODES or (arg and mode != "synthetic-scene"):
            raise UserError(f"face locator must be one of {', '.join(self.MODES)} (synthetic-scene:<scale>); "
                            f"got {mode!r}")
        try:
            self.scene_scale = float(arg) if arg else 0.8
        except ValueError:
            raise UserError(f"synthetic-scene:<scale> needs a number, got {arg!r}") from None
        self.mode, self.size = mode, size
        self._detector = None
        self._detector_args = (detector, detector_model_dir)

    def __call__(self, image: Image.Image) -> torch.Tensor | None:
        if self.mode == "aligned":
            return F.interpolate(to_tensor(image)[None], size=(self.size, self.size), mode="bilinear",
                                 antialias=True, align_corners=False)[0]
        if self.mode == "synthetic-scene":
            from faceclip_zoo.evaluation.synthetic_benchmark import scene_face_crop

            return scene_face_crop(to_tensor(image)[None], self.size, self.scene_scale)[0]
        from faceclip_zoo.data.align import crop_face
        from faceclip_zoo.data.detect import build_detector

        if self._detector is None:
            self._detector = build_detector(*self._detector_args)
        rgb = np.asarray(image.convert("RGB"))
        faces = self._detector.detect(rgb)
        if not faces:
            return None
        face = max(faces, key=lambda f: f.area)
        return torch.from_numpy(crop_face(rgb, face, self.size).crop.astype(np.float32) / 255.0).permute(2, 0, 1)


# ------------------------------------------------------------------ CLIP
class ClipModel:
    """Normalised image and text features of a CLIP model, with that model's own
    preprocessing (open_clip's eval transform, or the transformers image processor)."""

    def __init__(self, spec: str, device: str | torch.device = "cpu"):
        self.spec, self.device = spec, torch.device(device)
        kind, rest = _split(spec, "clip model", ("open_clip", "transformers", "zoo"))
        self.kind = kind
        if kind == "transformers":
            self._init_transformers(require_file(rest, "transformers CLIP folder"))
            return
        import open_clip
        from open_clip.transform import image_transform

        if kind == "open_clip":
            arch, _, weights = rest.partition(":")
            if arch not in open_clip.list_models():
                raise UserError(f"open_clip has no model {arch!r} (clip model {spec!r}); see open_clip.list_models()")
            require_file(weights, "open_clip weights")
            model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights)
            self.tokenizer = open_clip.get_tokenizer(arch)
        else:
            from faceclip_zoo.models.clip import build_tokenizer
            from faceclip_zoo.models.io import load_model_dir

            model = load_model_dir(rest, expect="clip")
            self.tokenizer = build_tokenizer(model.config.text)
            self.preprocess = image_transform(model.config.vision.image_size, is_train=False)
        self.model = model.eval().to(self.device)
        self.image_size = self.model.visual.image_size

    def _init_transformers(self, folder: Path) -> None:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().to(self.device)
        self.hf_tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        if len(self.hf_tokenizer) < 1000:  # an empty tokenizer silently maps every word to nothing
            raise UserError(f"the tokenizer in {folder} has {len(self.hf_tokenizer)} tokens; "
                            "the folder needs CLIP's vocab.json and merges.txt")
        self.processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)

    @torch.no_grad()
    def raw_image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Image embeddings as the model gives them (not normalised)."""
        if self.kind == "transformers":
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
            feats = self.model.get_image_features(pixel_values=pixels)
            feats = getattr(feats, "pooler_output", feats)
        else:
            pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
            feats = self.model.encode_image(pixels)
        return feats.float().cpu()

    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return F.normalize(self.raw_image_features(images), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        if self.kind == "transformers":
            tokens = self.hf_tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
            feats = self.model.get_text_features(**tokens)
            feats = getattr(feats, "pooler_output", feats)
        else:
            feats = self.model.encode_text(self.tokenizer(list(texts)).to(self.device))
        return F.normalize(feats.float(), dim=-1).cpu()


class ClipImageFeatures(nn.Module):
    """A CLIP image tower as a torchmetrics FID feature extractor: uint8 [N, 3, H, W] ->
    image embeddings (not normalised). FID on CLIP features is not comparable with
    Inception FID; results name which one was used."""

    def __init__(self, clip: ClipModel, batch_size: int = 32):
        super().__init__()
        self.clip, self.batch_size = clip, batch_size
        probe = clip.image_features([Image.new("RGB", (8, 8))])
        self.num_features = probe.shape[-1]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pil = [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in images.to(torch.uint8)]
        return torch.cat([self.clip.raw_image_features(pil[i:i + self.batch_size])
                          for i in range(0, len(pil), self.batch_size)]).double()


def build_fid(features: str, clip: ClipModel | None = None):
    """torchmetrics' FrechetInceptionDistance over Inception-v3 (torch-fidelity's FID
    network; its weights from a local file, never downloaded) or a CLIP image tower."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if features == "clip":
        if clip is None:
            raise UserError("fid.features: clip needs a clip_t.model to take the image tower from")
        return FrechetInceptionDistance(feature=ClipImageFeatures(clip), reset_real_features=False), f"clip ({clip.spec})"
    kind, weights = _split(features, "fid.features", ("inception",)) if features != "inception" else ("inception", "")
    if not weights:
        raise UserError("fid.features: inception needs its weights file, e.g. inception:/models/"
                        "pt_inception-2015-12-05-6726825d.pth (torch-fidelity's FID Inception; nothing is downloaded)")
    require_file(weights, "Inception weights")
    try:
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights,
                                          reset_real_features=False)
    except RuntimeError as exc:
        raise UserError(f"{weights} is not torch-fidelity's FID Inception-v3 state dict "
                        f"({str(exc).splitlines()[0][:160]})") from None
    return metric, f"inception-v3 ({weights})"
