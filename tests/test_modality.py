"""Cross-modal features: the scan's modality profile and top text rows against float64 numpy,
their text contexts, the dashboard's escaped highlight and the report's counts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reference

from sae_jax import scan as scan_lib
from sae_jax.formats import dictionary, topacts as topacts_lib
from sae_jax.store import (KIND_IMAGE_BASE, KIND_IMAGE_OTHER, KIND_TEXT, META_DTYPE, Store,
                           StoreWriter)
from sae_jax.formats.topacts import TopActs

D, N_LATENTS, K, GRID, TOP_N = 8, 16, 3, (2, 2), 3
TEXT_LATENT, IMAGE_LATENT = 0, 1  # planted: one fires on text rows only, one on image rows only
TEXT_AT = (2, 3, 4, 6)  # positions of the text tokens of every prompt; 0, 1 and 5 are image tokens
REPO = Path(__file__).resolve().parents[1]


def planted_params(rng):
  w_enc = rng.normal(size=(N_LATENTS, D)) * 0.3
  w_enc[TEXT_LATENT] = np.eye(D)[0] * 3  # reads dimension 0, which only text rows carry
  w_enc[IMAGE_LATENT] = np.eye(D)[1] * 3  # reads dimension 1, which only image rows carry
  params = {"W_enc": w_enc, "b_enc": np.full(N_LATENTS, -0.2), "W_dec": rng.normal(size=(N_LATENTS, D)),
            "b_dec": np.zeros(D)}
  params["W_dec"] /= np.linalg.norm(params["W_dec"], axis=1, keepdims=True)
  return params


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
  root = tmp_path_factory.mktemp("modality")
  rng = np.random.default_rng(1)
  params = planted_params(rng)
  export = dictionary.write(root / "export", "model.layers.0", params, k=K, layout="sparsify")
  writer = StoreWriter(root / "store", {"model": "synthetic", "hookpoint": "model.layers.0",
                                        "layer": 0, "d_model": D, "dtype": "float32",
                                        "settings": {"tokens": "all"}})
  grid = GRID[0] * GRID[1]
  image_id = 0
  for _ in range(2):  # 2 shards of 5 inputs: base patches, one other image token, 4 text tokens
    acts, metas, records = [], [], []
    for _ in range(5):
      kinds = [KIND_IMAGE_BASE] * grid + [KIND_IMAGE_OTHER] + [KIND_TEXT] * len(TEXT_AT)
      x = rng.normal(size=(len(kinds), D)).astype(np.float32) * 0.5
      x[:, :2] = 0
      x[:grid + 1, 1] = rng.uniform(0.5, 2, grid + 1)  # image rows carry dimension 1
      x[grid + 1:, 0] = rng.uniform(0.5, 2, len(TEXT_AT))  # text rows carry dimension 0
      meta = np.zeros(len(kinds), META_DTYPE)
      meta["image_id"], meta["kind"] = image_id, kinds
      meta["patch"] = [*range(grid), -1, *[-1] * len(TEXT_AT)]
      meta["position"] = [*range(7, 7 + grid), 5, *TEXT_AT]  # the order rows have need not matter
      acts.append(x), metas.append(meta)
      records.append({"id": image_id, "source": f"{image_id}.png", "grid": list(GRID),
                      "text_tokens": [[p, 100 + 10 * image_id + p] for p in TEXT_AT]})
      image_id += 1
    writer.write_shard(np.concatenate(acts), np.concatenate(metas), records, num_inputs=5)
  writer.finish()
  out = root / "topacts"
  scan_lib.scan(str(export), str(root / "store"), str(out), top_n=TOP_N, chunk_images=3,
                progress=False)
  return root, params, out


def reference_codes(root, params):
  store = Store(root / "store")
  meta = store.meta()
  x = np.stack([store[i] for i in range(len(meta))])
  values, indices = reference.encode_numpy(params, x, K)
  codes = np.zeros((len(meta), N_LATENTS))
  np.put_along_axis(codes, indices, values, 1)
  return meta, codes


def test_modality_mass_and_top_text_rows_match_numpy(planted):
  root, params, out = planted
  meta, codes = reference_codes(root, params)
  acts = TopActs(out)
  mass = np.stack([codes[meta["kind"] == k].sum(0)
                   for k in (KIND_IMAGE_BASE, KIND_IMAGE_OTHER, KIND_TEXT)], axis=1)
  np.testing.assert_allclose(acts.text["modality_mass"], mass, rtol=1e-5, atol=1e-5)
  assert acts.header["rows_by_kind"] == {"image_base": 40, "image_other": 10, "text": 40}
  text = np.flatnonzero(meta["kind"] == KIND_TEXT)
  for latent in range(N_LATENTS):  # brute force: sort every text row by its activation
    order = sorted((r for r in text if codes[r, latent] > 0), key=lambda r: (-codes[r, latent], r))
    got = acts.text_rows(latent)
    assert [t.row for t in got] == order[:TOP_N]
    np.testing.assert_allclose([t.value for t in got], codes[order[:TOP_N], latent], rtol=1e-5)
    assert [(t.image_id, t.position) for t in got] == [
        (int(meta["image_id"][r]), int(meta["position"][r])) for r in order[:TOP_N]]


def test_modality_profile_names_the_planted_latents(planted):
  root, params, out = planted
  meta, codes = reference_codes(root, params)
  profile = TopActs(out).modality()
  image = codes[meta["kind"] != KIND_TEXT].sum(0)
  text = codes[meta["kind"] == KIND_TEXT].sum(0)
  total = image + text
  with np.errstate(invalid="ignore", divide="ignore"):
    share = np.where(total > 0, text / total, 0.0)
    both = np.where(total > 0, np.minimum(image, text) / np.maximum(image, text), 0.0)
  np.testing.assert_allclose(profile["text_share"], share, atol=1e-5)
  np.testing.assert_allclose(profile["both"], both, atol=1e-5)
  assert profile["modality"][TEXT_LATENT] == "text"
  assert profile["modality"][IMAGE_LATENT] == "image"
  expected = np.where(total <= 0, "dead", np.where(both >= 0.1, "both",
                                                   np.where(text > image, "text", "image")))
  assert list(profile["modality"]) == list(expected)


def test_an_older_topacts_has_no_modality(tmp_path):
  import fakes
  fakes.write_topacts(tmp_path / "old")
  acts = TopActs(tmp_path / "old")
  assert acts.modality() is None and acts.text_rows(0) == [] and not acts.has_text()
  result = subprocess.run([sys.executable, "-m", "eval.report", f"--topacts={tmp_path / 'old'}",
                           f"--out={tmp_path / 'report'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert result.returncode == 0, result.stderr[-2000:]
  assert "without the modality profile" in (tmp_path / "report" / "report.md").read_text()


class FakeTokenizer:
  """Decodes id i to the word '<w i>' (markup, so the test sees it escaped)."""

  def decode(self, ids):
    return " ".join(f"<w{i}>" for i in ids)


def test_text_contexts_decode_a_window_around_the_firing_token(planted):
  from interpret import textctx
  root, params, out = planted
  acts = TopActs(out)
  records = {r["id"]: r for r in acts.images()}
  found = textctx.contexts(acts, TEXT_LATENT, records, FakeTokenizer(), window=2)
  rows = acts.text_rows(TEXT_LATENT)
  assert len(found) == len(rows) == TOP_N
  for c, row in zip(found, rows):
    assert c.token == f"<w{100 + 10 * row.image_id + row.position}>"
  # Every position, by hand: window 2 around TEXT_AT = (2, 3, 4, 6); 5 is an image token.
  class One:
    text_rows = lambda self, latent: [topacts_lib.TextRow(0, 0, p, 1.0) for p in TEXT_AT]
  m = textctx.IMAGE_MARK
  got = [(c.before, c.token, c.after) for c in textctx.contexts(One(), 0, records, FakeTokenizer(),
                                                                  window=2)]
  # (an image token shows between two text tokens of the window, not at its edge)
  assert got == [("", "<w102>", "<w103> <w104>"), ("<w102>", "<w103>", "<w104>"),
                 ("<w102> <w103>", "<w104>", m + " <w106>"), ("<w104> " + m, "<w106>", "")]
  old = {i: {k: v for k, v in r.items() if k != "text_tokens"} for i, r in records.items()}
  assert textctx.contexts(acts, TEXT_LATENT, old, FakeTokenizer()) is None


def test_dashboard_escapes_and_highlights_the_firing_token(planted, tmp_path):
  from interpret import dashboard, sources
  root, params, out = planted
  acts = TopActs(out)
  table = sources.open_table(acts, str(root / "store"), None)
  summary = dashboard.build_site(acts, table, [TEXT_LATENT, IMAGE_LATENT], {}, {}, tmp_path, {
      "image_size": 32, "num_images": None, "title": "t", "workers": 1,
      "tokenizer": FakeTokenizer(), "text_window": 2, "num_texts": None})
  assert {"text_share", "modality_both"} <= set(summary["score_names"])
  page = (tmp_path / "latents" / f"{TEXT_LATENT}.html").read_text()
  assert "<w1" not in page  # every decoded word escaped
  best = acts.text_rows(TEXT_LATENT)[0]
  firing = f"&lt;w{100 + 10 * best.image_id + best.position}&gt;"
  assert f'<mark class="firing">{firing}</mark>' in page
  assert "modality</th><td>text" in page
  assert "modality</th><td>image" in (tmp_path / "latents" / f"{IMAGE_LATENT}.html").read_text()


def test_report_counts_image_text_and_both(planted, tmp_path):
  root, params, out = planted
  meta, codes = reference_codes(root, params)
  image = codes[meta["kind"] != KIND_TEXT].sum(0)
  text = codes[meta["kind"] == KIND_TEXT].sum(0)
  ratio = np.minimum(image, text) / np.maximum(np.maximum(image, text), 1e-300)
  expected = {"image only": int(np.sum((image + text > 0) & (ratio < 0.1) & (image >= text))),
              "text only": int(np.sum((image + text > 0) & (ratio < 0.1) & (text > image))),
              "both": int(np.sum((image + text > 0) & (ratio >= 0.1))),
              "never fired": int(np.sum(image + text <= 0))}
  assert expected["text only"] >= 1 and expected["image only"] >= 1
  result = subprocess.run([sys.executable, "-m", "eval.report", f"--topacts={out}",
                           f"--out={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert result.returncode == 0, result.stderr[-2000:]
  markdown = (tmp_path / "report.md").read_text()
  for label, count in expected.items():
    assert f"| {label} | {count} |" in markdown, markdown


class RecordingExplainer:
  name, identity = "recorder", {"name": "recorder"}

  def __init__(self):
    self.prompts = []

  def complete(self, prompt):
    self.prompts.append(prompt)
    return "[EXPLANATION]: words"


def test_explainer_gets_text_contexts_for_text_dominant_latents(planted, tmp_path):
  from interpret import jobs, prompts, sources, textctx, topacts as selection
  root, params, out = planted
  acts = TopActs(out)
  chosen, _ = selection.select_latents(acts, f"{TEXT_LATENT}", with_text=True)
  assert chosen == [TEXT_LATENT] and not acts.has_images()[TEXT_LATENT]  # text only: kept
  assert selection.select_latents(acts, f"{TEXT_LATENT}")[0] == []  # images only by default
  explainer = RecordingExplainer()
  lines = textctx.prompt_lines_for(acts, FakeTokenizer(), window=1, limit=2)
  assert lines(IMAGE_LATENT) is None  # image-dominant: no text shown
  settings = jobs.JobSettings(concurrency=1, num_images=2, image_size=32, text_contexts=lines)
  jobs.run(acts, sources.open_table(acts, None, None), chosen, prompts.load_template(),
           explainer, tmp_path / "out", settings)
  (prompt,) = explainer.prompts
  best = acts.text_rows(TEXT_LATENT)[0]
  assert prompts.TEXT_INTRO in prompt.user and not prompt.images
  assert prompt.user.startswith(prompts.TEXT_ONLY_USER)  # not the template's image instructions
  with_images = prompts.load_template().render([b"png"], text_contexts=["a [[b]] c"])
  assert with_images.user.startswith("You will be shown 1 images")
  assert with_images.user.endswith(prompts.TEXT_INTRO + "\n1. a [[b]] c")
  assert f"1. {textctx.contexts(acts, TEXT_LATENT, {r['id']: r for r in acts.images()}, FakeTokenizer(), 1)[0].before}" in prompt.user
  assert f"[[<w{100 + 10 * best.image_id + best.position}>]]" in prompt.user
  (record,) = [json.loads(l) for l in (tmp_path / "out" / "explanations.jsonl").read_text().splitlines()]
  assert record["status"] == "ok" and len(record["text_contexts"]) == 2


def test_top_text_rows_do_not_depend_on_the_chunking(planted):
  root, params, out = planted
  model, _ = scan_lib.load_sae(str(root / "export"), "float32")
  store = Store(root / "store")
  whole = scan_lib.text_pass(model, store, TOP_N, np.zeros((N_LATENTS, 3)))
  mass = np.zeros((N_LATENTS, 3))
  chunked = scan_lib.text_pass(model, store, TOP_N, mass, chunk_rows=3)
  for name, array in TopActs(out).text.items():
    if name == "top_text_values":  # encoded in other batch shapes: equal up to rounding
      np.testing.assert_allclose(chunked[name], array, rtol=1e-6)
    elif name != "modality_mass":
      np.testing.assert_array_equal(chunked[name], array)
      np.testing.assert_array_equal(whole[name], array)


def test_tokenizer_comes_from_the_store_or_the_flag(planted, tmp_path):
  from interpret import textctx
  root, params, out = planted
  acts = TopActs(out)
  assert textctx.tokenizer_path(acts) == "synthetic"  # the store manifest's model
  assert textctx.tokenizer_path(acts, "/models/x") == "/models/x"
  class Moved:
    header = {"store": str(tmp_path / "gone")}
  with pytest.raises(textctx.TextContextError, match="--tokenizer"):
    textctx.tokenizer_path(Moved())


def test_dashboard_notes_a_store_without_text_tokens(planted, tmp_path):
  from interpret import dashboard, sources, textctx
  root, params, out = planted
  acts = TopActs(out)
  old = [{k: v for k, v in r.items() if k != "text_tokens"} for r in acts.images()]
  (out / "images.jsonl").rename(tmp_path / "images.jsonl")
  try:
    (out / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    acts = TopActs(out)
    dashboard.build_site(acts, sources.open_table(acts, None, None), [TEXT_LATENT], {}, {},
                         tmp_path / "site", {"image_size": 32, "num_images": None, "title": "t",
                                             "workers": 1, "tokenizer": "/no/such/tokenizer"})
  finally:
    (tmp_path / "images.jsonl").replace(out / "images.jsonl")
  page = (tmp_path / "site" / "latents" / f"{TEXT_LATENT}.html").read_text()
  assert "no text_tokens" in page and "reharvest" in page
  with pytest.raises(textctx.TextContextError, match="--tokenizer"):
    textctx.load_tokenizer(str(tmp_path / "no_tokenizer_here"))
