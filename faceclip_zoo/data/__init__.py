"""Data: the SPSV shard schema, DataModules, and the built-in synthetic identities."""

from faceclip_zoo.data.datamodule import ShardDataModule
from faceclip_zoo.data.synthetic import SyntheticIdentities

__all__ = ["ShardDataModule", "SyntheticIdentities"]
