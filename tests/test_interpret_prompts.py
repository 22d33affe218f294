"""Prompt templates, answer parsing, the TOPACTS reader and latent selection."""

import numpy as np
import pytest

from interpret import prompts, topacts
import fakes


@pytest.mark.parametrize("answer, expected", [
    ("Reasoning...\n[EXPLANATION]: striped fabric", ("ok", "striped fabric")),
    ("**[EXPLANATION]:** \"dog ears\"", ("ok", "dog ears")),
    ("[EXPLANATION]: a\n[EXPLANATION]: the last one wins", ("ok", "the last one wins")),
    ("[EXPLANATION]: Unable to produce descriptions", ("unable", None)),
    ("[EXPLANATION]: unable to produce descriptions.", ("unable", None)),
    ("[EXPLANATION]:   ", ("parse_error", None)),
    ("no tag at all", ("parse_error", None)),
    ("", ("parse_error", None)),
])
def test_parse_explanation(answer, expected):
  assert prompts.parse_explanation(answer) == expected


def test_default_template_has_the_papers_structure():
  template = prompts.load_template()
  prompt = template.render([b"png1", b"png2"])
  assert "meticulous" in prompt.system and "[EXPLANATION]:" in prompt.user
  assert "Unable to produce descriptions" in prompt.user and "highlighted" in prompt.user
  assert "2 images" in prompt.user and prompt.images == (b"png1", b"png2")


def test_custom_template_and_errors(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("# comment\n[system]\nBe brief.\n[user]\nLook at {num_images}.\n# kept\n")
  prompt = prompts.load_template(path).render([b"x"])
  assert (prompt.system, prompt.user) == ("Be brief.", "Look at 1.\n# kept")
  path.write_text("[user]\nonly a user part\n")
  with pytest.raises(prompts.TemplateError, match=r"\['system'\]"):
    prompts.load_template(path)
  with pytest.raises(prompts.TemplateError, match="cannot read"):
    prompts.load_template(tmp_path / "missing.txt")


def test_topacts_reader_and_selection(tmp_path):
  acts = topacts.TopActs(fakes.write_topacts(tmp_path / "t", top_n=3, no_images=(2, 7)))
  latent = acts.latent(1)
  assert list(latent.image_ids) == [1, 2, 3] and latent.maps.shape == (3, 16)
  assert latent.maps.dtype == np.float32 and len(acts.latent(2).image_ids) == 0
  assert topacts.parse_latent_spec("1,5,3-4,5") == [1, 5, 3, 4]
  assert topacts.select_latents(acts) == ([0, 1, 3, 4, 5, 6], 2)
  assert topacts.select_latents(acts, "6,0-3", max_latents=2) == ([6, 0], 1)
  # density is linspace(0.001, 0.5, 8): latents 2..4 lie in [0.1, 0.3].
  assert topacts.select_latents(acts, min_density=0.1, max_density=0.3) == ([3, 4], 1)
  assert topacts.select_latents(acts, restrict_to={0, 2}) == ([0], 1)
  with pytest.raises(topacts.TopActsError, match="--latents names"):
    topacts.select_latents(acts, "3,99")
  with pytest.raises(topacts.TopActsError, match="neither an integer"):
    topacts.parse_latent_spec("1,a")


def test_topacts_shape_mismatch_names_the_file(tmp_path):
  path = fakes.write_topacts(tmp_path / "t")
  np.save(path / "density.npy", np.zeros(3))
  with pytest.raises(topacts.TopActsError, match="density.npy"):
    topacts.TopActs(path)
