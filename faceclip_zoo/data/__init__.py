"""Data: the SPSV shard schema, the shard DataModule, and face alignment / preparation of
real photos. (The built-in synthetic world is faceclip_zoo.synthetic.)"""

from faceclip_zoo.data.align import AlignedFace, align_face
from faceclip_zoo.data.datamodule import ShardDataModule

__all__ = ["AlignedFace", "ShardDataModule", "align_face"]
