"""Data: the SPSV shard schema, DataModules, the built-in synthetic identities, and face
alignment / preparation of real photos."""

from faceclip_zoo.data.align import AlignedFace, align_face
from faceclip_zoo.data.datamodule import ShardDataModule
from faceclip_zoo.data.synthetic import SyntheticIdentities

__all__ = ["AlignedFace", "ShardDataModule", "SyntheticIdentities", "align_face"]
