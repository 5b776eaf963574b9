"""Adapters on a frozen denoiser: LoRA / DoRA through peft, a weight-only quantised base
through torchao, and the adapter file diffusers' `load_lora_weights` reads.

Nothing here is written by hand that the libraries do: diffusers' `add_adapter` injects
peft's LoRA layers (peft dispatches its torchao-aware layer over a quantised Linear),
torchao's `quantize_` replaces Linear weights by int8 / float8 tensors, peft's
`get_peft_model_state_dict` names the adapter weights as diffusers' loaders expect.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Literal, Optional, Union

import torch

from faceclip_zoo.utils import UserError

# The layers diffusers' own LoRA training scripts adapt, by denoiser class: SDXL's attention
# projections (train_dreambooth_lora_sdxl.py), FLUX's attention and feed-forward
# projections of both streams (train_dreambooth_lora_flux.py), Wan's self- and
# cross-attention and feed-forward projections (Wan's own LoRA recipes: q, k, v, o, ffn).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "UNet2DConditionModel": ["to_k", "to_q", "to_v", "to_out.0"],
    "WanTransformer3DModel": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"],
    "FluxTransformer2DModel": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                    "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                    "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"],
}

Quantization = Literal["int8", "float8"]


@dataclass
class LoraSettings:
    """What a recipe says about the adapters (`model.init_args.lora`).

    Args:
        rank: the adapters' rank r.
        alpha: the scale numerator (update = alpha / r * B A); None = rank (scale 1).
        dropout: dropout on the adapters' input.
        target_modules: module names (peft matching: suffixes) to adapt; None = the
            layers diffusers' LoRA scripts adapt for this denoiser class (DEFAULT_TARGETS).
        init: peft's `init_lora_weights`: true (B = 0: the run starts at the base),
            "gaussian", "pissa", "olora", ...
        use_dora: weight-decomposed adapters (DoRA) instead of plain LoRA.
    """

    rank: int = 16
    alpha: Optional[float] = None
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None
    init: Union[bool, str] = True
    use_dora: bool = False

    def peft_config(self, denoiser_class: str):
        from peft import LoraConfig

        if self.rank < 1:
            raise UserError(f"lora.rank must be >= 1, got {self.rank}")
        return LoraConfig(r=self.rank, lora_alpha=self.alpha if self.alpha is not None else self.rank,
                          lora_dropout=self.dropout, init_lora_weights=self.init, use_dora=self.use_dora,
                          target_modules=list(self.target_modules or DEFAULT_TARGETS[denoiser_class]))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: "dict | LoraSettings | None") -> "LoraSettings | None":
        return d if d is None or isinstance(d, LoraSettings) else cls(**d)


def add_lora(model: torch.nn.Module, settings: LoraSettings, denoiser: str) -> None:
    """Inject the adapters (diffusers' PeftAdapterMixin.add_adapter): afterwards only the
    adapter weights require grad."""
    config = settings.peft_config(type(model).__name__)
    try:
        with warnings.catch_warnings():
            # peft's layer over a torchao-quantised Linear says it cannot merge into an int8
            # weight; we never do (export merges into the full-precision base).
            warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
            model.add_adapter(config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise UserError(f"lora.target_modules {config.target_modules} do not fit this {denoiser}: {err}") from None


def is_adapter_weight(name: str) -> bool:
    return "lora_" in name


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in the naming diffusers' `save_lora_weights` / `load_lora_weights` use."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def quantize_frozen(model: torch.nn.Module, mode: Quantization, device: torch.device | str | None = None,
                    piece_bytes: int = 2**30) -> None:
    """Weight-only quantisation of every Linear (torchao `quantize_`), in place: int8 on any
    device, float8 where the GPU has float8 matmuls (compute capability >= 8.9). Done before
    the adapters are added, so they stay in full precision (peft wraps the quantised Linear
    in its torchao layer).

    `device`: where the quantised model is to run (default: where it is). The model is moved
    there piece by piece, each piece (at most `piece_bytes` of weights) quantised as it arrives: a
    bf16 base larger than the card (FLUX.1-dev's transformer: 23.8 GB) reaches a 24 GB card
    already quantised, the GPU does the quantising (minutes on a host's CPUs), and float8
    sees its GPU although `fit` sets a model up before moving it."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    device = torch.device(device) if device is not None else next(model.parameters()).device
    if mode == "int8":
        config = Int8WeightOnlyConfig()
    elif mode == "float8":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise UserError("quantize float8 needs a CUDA GPU with float8 support (compute capability >= 8.9: "
                            "Ada, Hopper or newer); use int8 elsewhere")
        config = Float8WeightOnlyConfig()
    else:
        raise UserError(f"unknown quantization {mode!r}: int8 or float8")
    for piece in _pieces(model, piece_bytes):
        quantize_(piece.to(device), config)
    model.to(device)  # what no piece holds (a recursed module's own parameters and buffers)


def _pieces(module: torch.nn.Module, max_bytes: int):
    """The module, or (when larger than max_bytes) its children's pieces, recursively."""
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    children = list(module.children())
    if size <= max_bytes or not children:
        yield module
        return
    for child in children:
        yield from _pieces(child, max_bytes)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
