"""The synthetic world: procedural identities with captions (faces.py, world.py), the small
frozen models that play ArcFace, CLIP and the VAE in it (priors.py), its DataModule
(datamodule.py: the recipes' default data). Its benchmark, judge and caption reader are
evaluation's (evaluation/synthetic_benchmark.py, protocol.py, judge.py, attributes.py).
Everything here exists so that the whole method runs and is measured on a CPU, with
nothing downloaded."""

from faceclip_zoo.synthetic.datamodule import SyntheticIdentities

__all__ = ["SyntheticIdentities"]
