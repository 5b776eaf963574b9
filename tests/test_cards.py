"""Model cards: lineage from a converted release reaches every model trained from it."""

import json

import yaml
from huggingface_hub import ModelCard

from faceclip_zoo.cards import RELEASE_REPO, inherited_lineage
from faceclip_zoo.config import FaceCLIPConfig
from faceclip_zoo.convert import _write_cards
from faceclip_zoo.models import FaceCLIPEncoder
from faceclip_zoo.models.io import save_model_dir


def test_converted_folders_carry_the_release_licence_and_pass_it_on(tmp_path):
    converted = tmp_path / "official" / "faceclip-tiny"
    save_model_dir(FaceCLIPEncoder(FaceCLIPConfig.from_name("faceclip-tiny")), converted,
                   recipe="# made by: python -m faceclip_zoo convert --official x --out y\nconvert: {}\n")
    (tmp_path / "official" / "unrelated").mkdir()
    _write_cards(tmp_path / "official", tmp_path / "FaceCLIP")
    card = ModelCard.load(converted / "README.md")
    assert card.data.license == "cc-by-nc-4.0" and card.data.base_model == RELEASE_REPO
    assert "`faceclip` model directory" in card.text and "load_model_dir" in card.text
    assert not (tmp_path / "official" / "unrelated" / "README.md").exists()
    # a run starting from that folder inherits both; one from named configs does not
    recipe = yaml.safe_dump({"model": {"init_args": {"encoder_l": str(converted), "encoder_g": "faceclip-tiny"}}})
    assert inherited_lineage(recipe) == (True, RELEASE_REPO)
    scratch = yaml.safe_dump({"model": {"init_args": {"encoder_l": "faceclip-tiny"}}})
    assert inherited_lineage(scratch) == (False, None)
    assert json.loads((converted / "config.json").read_text())["model_type"] == "faceclip"
