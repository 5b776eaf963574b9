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

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional

from faceclip_zoo.config import FaceT5Config
from faceclip_zoo.models.facet5 import FaceT5Encoder
from faceclip_zoo.tasks.faceclip_encoder import FaceCLIPEncoderModule
from faceclip_zoo.models.weights import open_weights
from faceclip_zoo.utils import UserError, load_strict, load_weights_file, mismatch_report, shapes_of


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
        enc = FaceT5Encoder(cfg, empty_parts=self.empty_encoder_parts())
        if self._t5_tokenizer:
            enc.set_tokenizer(self._t5_tokenizer)
        return cfg, enc

    def empty_encoder_parts(self) -> set[str]:
        parts = super().empty_encoder_parts()
        if self.hparams.get("t5_weights") and not self.hparams.get("init_encoder"):
            parts.add("t5_encoder")  # T5-XXL: 19 GB of random float32 otherwise, then its file beside it
        return parts

    def frozen_parts(self) -> list:
        parts = super().frozen_parts()
        return parts + [self.encoder.t5_encoder] if not self.hparams.get("unfreeze_text_layers") else parts

    def sequence_length(self) -> int:
        return self.encoder_config.text_length

    def load_text_weights(self) -> None:
        """T5's weights: a transformers T5EncoderModel folder (`model.safetensors` or shards
        with their index, as FLUX.1-dev's text_encoder_2), a .safetensors file (read lazily,
        tensor by tensor, into the T5 built without memory) or a torch pickle."""
        src = self.hparams.get("t5_weights")
        if not src:
            return
        path = Path(src)
        if path.is_dir() or path.suffix == ".safetensors":
            state = open_weights(path, "model", "T5 encoder weights")
        else:
            state = load_weights_file(path, "T5 encoder weights")
        # encoder.embed_tokens is tied to shared: loaded through shared, then tied again
        tied = "encoder.embed_tokens.weight"
        t5 = self.encoder.t5_encoder
        view = {k: v for k, v in t5.state_dict(keep_vars=True).items() if k != tied}
        report = mismatch_report(shapes_of(view), {k: v for k, v in shapes_of(state).items() if k != tied})
        if report:
            raise UserError(f"T5 encoder weights {src} do not match the encoder's T5: {report}")
        dtype = self.frozen_torch_dtype() if t5 in self.frozen_parts() else None
        load_strict(t5, _WithTied(state, tied, "shared.weight"), f"T5 encoder weights {src}", dtype=dtype)
        self.encoder.tie_embeddings()


class _WithTied(Mapping):
    """A state dict whose tied key reads its twin (T5 files may or may not store it)."""

    def __init__(self, state: Mapping, tied: str, twin: str):
        self._state, self._tied, self._twin = state, tied, twin

    def __getitem__(self, key: str):
        return self._state[self._twin if key == self._tied else key]

    def __iter__(self):
        yield from (k for k in self._state if k != self._tied)
        yield self._tied

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def shapes(self) -> dict[str, tuple]:  # read from headers when the state is lazy
        shapes = dict(shapes_of(self._state))
        shapes[self._tied] = shapes[self._twin]
        return shapes
