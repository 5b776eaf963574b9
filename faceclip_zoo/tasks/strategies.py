"""Sharded training for every task of the zoo, on Lightning's FSDPStrategy.

`ZooFSDPStrategy` is FSDPStrategy with the policy these models need, so a recipe states
it in one line: each repeated block of any model in the zoo (FLUX double/single blocks, Wan
blocks, SDXL transformer and ResNet blocks, T5 / umT5 / CLIP / open_clip text blocks, the face ViT's
blocks, the fuser's layers) is its own FSDP unit, and the blocks that train have their
activations recomputed in backward. The frozen encoders are sharded too (FaceT5's T5 is
4.8 B parameters) but not checkpointed: they run without a graph.

Why FLUX needs it: full fine-tuning (11.9 B trainable parameters + the 6.3 B frozen
FaceT5) does not fit one 80 GB GPU with DDP, where every GPU holds the fp32 weights,
gradients and AdamW states (16 bytes/parameter = 190 GB).

DDP needs nothing of ours: `strategy: ddp` in a recipe. Multi-node launch (SLURM, torchrun)
is Lightning's own; see recipes/launch/.
"""

from __future__ import annotations

from typing import Literal

from lightning.pytorch.strategies import FSDPStrategy


def flux_block_classes() -> set[type]:
    """The repeated blocks of FLUX's transformer (double and single stream)."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    return {FluxTransformerBlock, FluxSingleTransformerBlock}


def wan_block_classes() -> set[type]:
    """The repeated blocks of Wan's video transformer (self-, cross-attention, feed-forward)."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    return {WanTransformerBlock}


def sdxl_block_classes() -> set[type]:
    """The repeated blocks of the SDXL UNet (attention and ResNet)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    return {BasicTransformerBlock, ResnetBlock2D}


def encoder_block_classes() -> set[type]:
    """The repeated blocks of the frozen encoders (T5, umT5, CLIP text / vision, face ViT)."""
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.t5.modeling_t5 import T5Block
    from transformers.models.umt5.modeling_umt5 import UMT5Block

    from faceclip_zoo.models.face_vit import Block as FaceViTBlock

    return {T5Block, UMT5Block, CLIPEncoderLayer, FaceViTBlock}


def joint_encoder_block_classes() -> set[type]:
    """The blocks of the joint encoders that train: the fuser's layers and the text
    towers (open_clip's blocks, also those of the frozen CLIP targets)."""
    from open_clip.transformer import ResidualAttentionBlock

    from faceclip_zoo.models.fusion import BiAttentionBlock, FaceSelfAttentionLayer, TextSelfAttentionLayer

    return {ResidualAttentionBlock, BiAttentionBlock, TextSelfAttentionLayer, FaceSelfAttentionLayer}


def trained_block_classes() -> set[type]:
    return flux_block_classes() | wan_block_classes() | sdxl_block_classes() | joint_encoder_block_classes()


def all_block_classes() -> set[type]:
    return trained_block_classes() | encoder_block_classes()


# Large single layers outside any block (the face ViT's feature layer, the encoders'
# flattened heads: 30-85 M parameters each) are units of their own too. Embeddings are
# not: T5 shares its embedding between two parents, which FSDP cannot wrap once.
LARGE_LINEAR = 10_000_000


def zoo_wrap_policy():
    """FSDP auto-wrap policy: every block of all_block_classes() and every large Linear."""
    from torch import nn
    from torch.distributed.fsdp.wrap import CustomPolicy

    blocks = tuple(all_block_classes())

    def is_unit(module: nn.Module) -> bool:
        return isinstance(module, blocks) or (isinstance(module, nn.Linear) and module.weight.numel() >= LARGE_LINEAR)

    return CustomPolicy(is_unit)


class ZooFSDPStrategy(FSDPStrategy):
    """FSDP for any faceclip_zoo task: every block (and large Linear) an FSDP unit, trained blocks
    activation-checkpointed (off with activation_checkpointing=False).

    Args:
        sharding_strategy: FULL_SHARD (default: parameters, gradients and optimizer state
            sharded over all GPUs), SHARD_GRAD_OP, HYBRID_SHARD (sharded within a node,
            replicated across nodes: less inter-node traffic; the mesh is (num_nodes,
            devices) unless `device_mesh` is given), NO_SHARD.
        activation_checkpointing: recompute each trained block's activations in backward.
        state_dict_type: "full" (one checkpoint file gathered on rank 0, what `export`
            reads) or "sharded" (one file per rank, written in parallel: for models whose
            full state does not fit rank 0's memory; resume reads it back with the same
            world size).
        device_mesh: (replicas, shards) for HYBRID_SHARD.
        cpu_offload: keep sharded parameters in CPU memory between uses.
    """

    def __init__(
        self,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
        activation_checkpointing: bool = True,
        state_dict_type: Literal["full", "sharded"] = "full",
        device_mesh: tuple[int, int] | None = None,
        cpu_offload: bool = False,
    ):
        super().__init__(
            auto_wrap_policy=zoo_wrap_policy(),
            activation_checkpointing_policy=trained_block_classes() if activation_checkpointing else None,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            device_mesh=tuple(device_mesh) if device_mesh else None,
            cpu_offload=cpu_offload,
            use_orig_params=True,  # frozen and trainable parameters share wrap units
        )
        self._hybrid = sharding_strategy == "HYBRID_SHARD"

    def setup_environment(self) -> None:
        if self._hybrid and self.kwargs.get("device_mesh") is None:
            # replicate across nodes, shard within one
            self.kwargs["device_mesh"] = (self.num_nodes, self.num_processes)
        super().setup_environment()
