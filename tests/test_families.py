"""One declaration per diffusion family: each pipeline class declares its kind, each task
declares only its own arguments, and nothing else names a family."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from faceclip_zoo.pipelines.family import ZooPipeline, pipeline_classes
from faceclip_zoo.tasks import FluxJointModule, SDXLJointModule, WanJointModule
from faceclip_zoo.tasks.diffusion import JointDiffusionModule

TASKS = [SDXLJointModule, FluxJointModule, WanJointModule]
PACKAGE = Path(__file__).resolve().parents[1] / "faceclip_zoo"


def test_every_family_declares_its_kind_and_its_task_points_at_it():
    families = pipeline_classes()
    assert set(families) == {"sdxl_pipeline", "flux_pipeline", "wan_pipeline"}
    declared = [name for name in ZooPipeline.__annotations__ if name.isupper()]
    for kind, cls in families.items():
        assert cls.ZOO_KIND == kind
        missing = [name for name in declared if getattr(cls, name, None) is None and name != "DISTILLED_GUIDANCE_ARGUMENT"]
        assert not missing, f"{cls.__name__} does not declare {missing}"
        assert cls.GUIDANCE_ARGUMENT in cls.RELEASE_DEFAULTS
    assert {task.PIPELINE for task in TASKS} == set(families.values())
    for task in TASKS:
        arguments = task.argument_defaults()
        # every component folder of the family's pipeline supplies one of its task's arguments
        assert set(task.PIPELINE.TRAINING_PARTS.values()) <= set(arguments)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.__name__)
def test_a_family_task_declares_only_its_own_arguments(task):
    shared = set(inspect.signature(JointDiffusionModule.__init__).parameters) - {"self"}
    own = inspect.signature(task.__init__).parameters
    assert not shared & set(own), f"{task.__name__} restates {sorted(shared & set(own))}"
    assert list(own)[-1] == "kwargs" and own["kwargs"].kind is inspect.Parameter.VAR_KEYWORD
    assert len(shared) >= 20  # the shared ones are declared once, in the base


def test_recipes_see_the_shared_arguments_with_their_help():
    from jsonargparse import ArgumentParser

    for task in TASKS:
        parser = ArgumentParser()
        parser.add_class_arguments(task, "model")
        text = " ".join(parser.format_help().split())
        assert "--model.condition_dropout" in text and "--model.identity_loss" in text
        assert "classifier-free guidance" in text  # the base's docstring reaches --help


def test_no_module_names_a_family_class_to_dispatch_on_it():
    """No class-name tables and no dispatch by type name: the families' own files name
    themselves; elsewhere a family is reached through its classes' declarations."""
    own = {"pipelines/sdxl.py", "pipelines/flux.py", "pipelines/wan.py", "tasks/sdxl.py", "tasks/flux.py",
           "tasks/wan.py", "tasks/__init__.py",
           "pipelines/__init__.py", "__init__.py"}
    pattern = re.compile(r"""["'](FaceCLIPSDXLPipeline|FaceT5FluxPipeline|SDXLJointModule|FluxJointModule|"""
                         r"""FaceT5WanPipeline|WanJointModule|sdxl_pipeline|flux_pipeline|wan_pipeline|SDXL|FLUX|Wan)["']""")
    found = [f"{p.relative_to(PACKAGE)}: {m.group(0)}" for p in sorted(PACKAGE.rglob("*.py"))
             if str(p.relative_to(PACKAGE)) not in own for m in pattern.finditer(p.read_text())]
    assert found == []
