"""Distributed strategies of the diffusion stages, named so a recipe states them in one line.

Full FLUX fine-tuning (11.9 B trainable parameters + the 6.3 B frozen FaceT5) does not fit
one 80 GB GPU with DDP: every GPU would hold the fp32 weights, gradients and AdamW states
(16 bytes/parameter = 190 GB). FluxFSDPStrategy is Lightning's FSDPStrategy with the
policy this model needs: FULL_SHARD, one FSDP unit per FLUX double/single block and per
T5 block, and activation checkpointing of the FLUX blocks.
"""

from __future__ import annotations

from typing import Literal

from lightning.pytorch.strategies import FSDPStrategy


def flux_block_classes() -> set[type]:
    """The repeated blocks of FLUX's transformer (double and single stream)."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    return {FluxTransformerBlock, FluxSingleTransformerBlock}


def encoder_block_classes() -> set[type]:
    """The repeated blocks of the frozen encoders (sharded too: FaceT5's T5 is 4.8 B)."""
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.t5.modeling_t5 import T5Block

    return {T5Block, CLIPEncoderLayer}


class FluxFSDPStrategy(FSDPStrategy):
    """FSDP for FluxJointModule: full sharding, FLUX + encoder blocks as wrap units,
    activation checkpointing of the FLUX blocks (off with activation_checkpointing=False).

    Args:
        sharding_strategy: FULL_SHARD (default), SHARD_GRAD_OP, HYBRID_SHARD, ...
        activation_checkpointing: recompute each FLUX block's activations in backward.
        state_dict_type: "full" (one checkpoint file, gathered on rank 0; what `export`
            reads) or "sharded".
    """

    def __init__(
        self,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
        activation_checkpointing: bool = True,
        state_dict_type: Literal["full", "sharded"] = "full",
    ):
        blocks = flux_block_classes()
        super().__init__(
            auto_wrap_policy=blocks | encoder_block_classes(),
            activation_checkpointing_policy=blocks if activation_checkpointing else None,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            use_orig_params=True,  # frozen and trainable parameters share wrap units
        )
