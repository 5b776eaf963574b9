"""FaceT5EncoderModule: the same three-loss contrastive pre-training (Eq. 3) with the T5
backbone of FaceT5 (docs/design.md, "FaceT5 for FLUX").

Everything but the encoder family is FaceCLIPEncoderModule's: frozen CLIP image/text
targets, the face-ID target, the heads, the loss terms, validation metrics and export.
Differences: the encoder is a FaceT5Encoder (T5 v1.1 + face ViT + plain-attention fuser),
its text backbone is initialised from a transformers T5EncoderModel (FLUX.1-dev's
text_encoder_2 or google/t5-v1_1-xxl), and the heads pool by mean over the 512 tokens
(a Linear over 512 x 4096 flattened values would have 1.6 B parameters per head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from faceclip_zoo.config import FaceT5Config
from faceclip_zoo.models.facet5 import FaceT5Encoder
from faceclip_zoo.tasks.faceclip_encoder import FaceCLIPEncoderModule
from faceclip_zoo.utils import UserError, load_weights_file, mismatch_report, shapes_of


class FaceT5EncoderModule(FaceCLIPEncoderModule):
    """Pre-trains a FaceT5 encoder. Arguments as FaceCLIPEncoderModule, plus:

    Args:
        encoder: named FaceT5Config (`facet5-xxl`, `facet5-tiny`).
        t5_tokenizer: folder of the T5 v1.1 tokenizer (needed unless the config uses the
            builtin vocabulary).
        t5_weights: T5 encoder weights: a transformers T5EncoderModel folder (single or
            sharded safetensors) or file (FaceCLIPEncoderModule's `text_weights` has no use here).
        head_pool: as FaceCLIPEncoderModule's, default "mean" (a flattening head over
            512 x 4096 values would be too large).
    """

    MODEL_TYPE = "facet5"

    def __init__(
        self,
        encoder: str = "facet5-tiny",
        t5_tokenizer: Optional[str] = None,
        t5_weights: Optional[str] = None,
        head_pool: Literal["flatten", "mean"] = "mean",
        **kwargs: Any,
    ):
        # Every other argument is FaceCLIPEncoderModule's, forwarded as it is (jsonargparse
        # reads them from the parent's signature for recipes and --help).
        if kwargs.get("text_weights"):
            raise UserError("FaceT5EncoderModule: text_weights names a CLIP text tower, which FaceT5 has not; "
                            "give the T5 encoder as t5_weights")
        self._t5_tokenizer = t5_tokenizer
        super().__init__(encoder=encoder, head_pool=head_pool, **kwargs)

    def build_encoder(self, name: str, overrides: dict[str, Any]):
        cfg = FaceT5Config.from_name(name, **overrides)
        enc = FaceT5Encoder(cfg)
        if self._t5_tokenizer:
            enc.set_tokenizer(self._t5_tokenizer)
        return cfg, enc

    def sequence_length(self) -> int:
        return self.encoder_config.text_length

    def load_text_weights(self) -> None:
        src = self.hparams.get("t5_weights")
        if not src:
            return
        path = Path(src)
        if path.is_dir() and not (path / "model.safetensors").exists():
            # a transformers folder with sharded weights: transformers reads its index
            from transformers import T5EncoderModel

            try:
                state = T5EncoderModel.from_pretrained(str(path), local_files_only=True).state_dict()
            except Exception as exc:
                raise UserError(f"cannot read T5 encoder weights from {path} ({type(exc).__name__})") from None
        else:
            state = load_weights_file(path, "T5 encoder weights")
        # encoder.embed_tokens is tied to shared: checked and loaded through shared
        tied = "encoder.embed_tokens.weight"
        state = {k: v for k, v in state.items() if k != tied}
        t5 = self.encoder.t5_encoder
        report = mismatch_report({k: v for k, v in shapes_of(t5.state_dict()).items() if k != tied}, shapes_of(state))
        if report:
            raise UserError(f"T5 encoder weights {src} do not match the encoder's T5: {report}")
        t5.load_state_dict({**state, tied: state["shared.weight"]})
