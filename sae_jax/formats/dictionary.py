"""Exported dictionaries: write and read the sparsify and SAELens layouts (numpy + safetensors only).

Our parameters are latent-major: W_enc [n, d], b_enc [n], W_dec [n, d] (unit rows), b_dec [d], and
    pre = ReLU(W_enc (x - b_dec) + b_enc),   z = TopK_k(pre),   x_hat = W_dec^T z + b_dec.
A JumpReLU dictionary (a BatchTopK SAE at inference) adds threshold [n] and has no k:
    z = pre * (pre > threshold).

Layouts (docs/formats.md has the details):
  sparsify: DIR/<hookpoint>/cfg.json  {expansion_factor, normalize_decoder, num_latents, k, multi_topk, d_in}
            DIR/<hookpoint>/sae.safetensors  encoder.weight [n,d], encoder.bias [n], W_dec [n,d], b_dec [d]
  saelens:  DIR/<hookpoint>/cfg.json  (architecture "topk" with k, or "jumprelu"; d_in, d_sae, ...)
            DIR/<hookpoint>/sae_weights.safetensors  W_enc [d,n], W_dec [n,d], b_enc [n], b_dec [d]
            (+ threshold [n] for jumprelu)
  ours:     DIR/<hookpoint>/sae_jax.json  provenance, input scale, training metrics (a sidecar the
            consumers' loaders never read, because the paper's loader rejects unknown cfg keys).

One format per folder: `write` refuses a folder that holds the other layout. `read` also takes
dictionaries trained by those libraries; an option of theirs that changes the latents is folded in
exactly (SAELens's rescale_acts_by_decoder_norm and apply_b_dec_to_input=false) or refused by name,
never ignored. The sparsify layout has no threshold: a JumpReLU dictionary is refused there.

This module is shared by `sae_jax.export`, `sae_jax.train --init_from`, `sae_jax.scan` and the torch
side (`interpret`), so it must stay free of jax and torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from sae_jax.files import atomic_write_json, atomic_write_with

SIDECAR = "sae_jax.json"
WEIGHTS = {"sparsify": "sae.safetensors", "saelens": "sae_weights.safetensors"}
TENSORS = {"sparsify": {"encoder.weight", "encoder.bias", "W_dec", "b_dec"},
           "saelens": {"W_enc", "W_dec", "b_enc", "b_dec"}}
# SAELens >= 6 reads cfg.json's nested `metadata` only when it names a version >= 6.0.0; without
# one it takes the file for a 5.x config and rebuilds `metadata` from top-level keys (losing it).
SAELENS_CFG_VERSION = "6.0.0"
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
THRESHOLD = "threshold"  # the extra parameter of a JumpReLU dictionary


class DictionaryError(ValueError):
  """An export folder that is missing, malformed, or not one of the supported layouts."""


def fold_input_scale(params: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
  """Returns weights that act on raw activations x for an SAE trained on `scale * x`.

  pre(scale*x) = W_enc (scale*x - b_dec) + b_enc = scale * [W_enc (x - b_dec/scale) + b_enc/scale].
  TopK is unchanged by the positive factor, so with b_enc/scale and b_dec/scale the raw-space SAE
  picks the same latents with values z/scale (in raw-activation units), and
  x_hat_raw = (W_dec^T z + b_dec)/scale = W_dec^T (z/scale) + b_dec/scale keeps W_dec unit-norm.
  A JumpReLU keeps latent i where pre_i(scale*x) = scale * pre_i(x) > threshold_i, i.e. where the
  raw-space pre-activation exceeds threshold_i/scale.
  """
  folded = {"W_enc": params["W_enc"], "b_enc": params["b_enc"] / scale,
            "W_dec": params["W_dec"], "b_dec": params["b_dec"] / scale}
  if THRESHOLD in params:
    folded[THRESHOLD] = params[THRESHOLD] / scale
  return folded


def _check_shapes(params: dict[str, np.ndarray]) -> tuple[int, int]:
  n, d = params["W_enc"].shape
  expected = {"W_enc": (n, d), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
  if THRESHOLD in params:
    expected[THRESHOLD] = (n,)
  for name, shape in expected.items():
    if tuple(params[name].shape) != shape:
      raise DictionaryError(f"{name} has shape {tuple(params[name].shape)}, expected {shape}")
  return n, d


def write(out: str | Path, hookpoint: str, params: dict[str, np.ndarray], *, k: int | None,
          layout: str, dtype: str = "float32", multi_topk: bool = False,
          sidecar: dict | None = None) -> Path:
  """Writes one dictionary in `layout` ("sparsify" | "saelens") to out/<hookpoint>/.

  A TopK dictionary needs its `k`; a JumpReLU one (params with a threshold) has none (k=None) and
  only the SAELens layout can hold it.
  """
  if layout not in WEIGHTS:
    raise DictionaryError(f"unknown layout {layout!r}; expected 'sparsify' or 'saelens'")
  jumprelu = THRESHOLD in params
  if jumprelu and layout == "sparsify":
    raise DictionaryError("a JumpReLU dictionary (BatchTopK at inference) cannot be written as "
                          "--format=sparsify, which has no threshold; use --format=saelens")
  if jumprelu != (k is None):
    raise DictionaryError(f"k={k!r}: a TopK dictionary needs k, a JumpReLU one (with a "
                          "threshold) takes none")
  n, d = _check_shapes(params)
  cast = {name: np.ascontiguousarray(np.asarray(v, np.float32).astype(DTYPES[dtype]))
          for name, v in params.items()}
  folder = Path(out) / hookpoint
  check_hookpoint(folder, recorded_hookpoint({}, sidecar or {}))
  found = layout_of(folder)
  if found not in (None, layout):
    raise DictionaryError(f"{folder} holds a {found} export ({WEIGHTS[found]}); refusing to write "
                          f"a {layout} export into it: one format per folder, use another --out")
  folder.mkdir(parents=True, exist_ok=True)
  if layout == "sparsify":
    cfg = {"expansion_factor": n // d, "normalize_decoder": True, "num_latents": n, "k": k,
           "multi_topk": multi_topk, "d_in": d}
    tensors = {"encoder.weight": cast["W_enc"], "encoder.bias": cast["b_enc"],
               "W_dec": cast["W_dec"], "b_dec": cast["b_dec"]}
  else:
    meta = (sidecar or {}).get("source", {})
    # SAELens's JumpReLUSAEConfig has the base fields only (no k, no decoder-norm rescaling).
    arch = ({"architecture": "jumprelu"} if jumprelu else
            {"architecture": "topk", "k": k, "rescale_acts_by_decoder_norm": False})
    cfg = {**arch, "d_in": d, "d_sae": n, "dtype": dtype, "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"sae_lens_version": SAELENS_CFG_VERSION, "model_name": meta.get("model"),
                        "hook_name": hookpoint, "model_class_name": meta.get("model_class"),
                        "prepend_bos": True, "dataset_path": meta.get("store"),
                        "context_size": None}}
    tensors = {"W_enc": np.ascontiguousarray(cast["W_enc"].T), "W_dec": cast["W_dec"],
               "b_enc": cast["b_enc"], "b_dec": cast["b_dec"]}
    if jumprelu:
      tensors[THRESHOLD] = cast[THRESHOLD]
  atomic_write_with(folder / WEIGHTS[layout], lambda tmp: save_file(tensors, str(tmp)))
  atomic_write_json(folder / "cfg.json", cfg)
  if sidecar is not None:
    atomic_write_json(folder / SIDECAR, sidecar)
  return folder


def layer_index(hookpoint: str) -> int | None:
  """Decoder layer of a hookpoint name ('model.layers.24', '...language_model.layers.24': the
  output of block 24), or None for a name of another form."""
  match = re.search(r"(?:^|\.)layers\.(\d+)$", hookpoint)
  return int(match.group(1)) if match else None


def recorded_hookpoint(cfg: dict, sidecar: dict) -> str | None:
  """The hookpoint a dictionary was trained on, from its own metadata: our sidecar's source (the
  store's hookpoint), else SAELens's metadata.hook_name (hook_name before SAELens 6)."""
  return ((sidecar.get("source") or {}).get("hookpoint")
          or (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name"))


def check_hookpoint(folder: Path, recorded: str | None) -> None:
  """A folder named for one layer holding a dictionary of another is refused (steering or
  splicing it at the folder's layer would silently use the wrong residual stream)."""
  named = layer_index(folder.name)
  if recorded is not None and named is not None and named != layer_index(recorded):
    raise DictionaryError(f"{folder} is named for layer {named}, but the dictionary in it was "
                          f"trained on {recorded}")


def layout_of(folder: Path) -> str | None:
  """The layout whose weights file `folder` holds, or None when it holds neither."""
  found = [layout for layout, name in WEIGHTS.items() if (folder / name).exists()]
  if len(found) > 1:
    raise DictionaryError(f"{folder} holds both sae.safetensors (sparsify) and "
                          "sae_weights.safetensors (SAELens); keep one")
  return found[0] if found else None


def find_dictionary(path: str | Path) -> Path:
  """The folder holding cfg.json: `path` itself, or its only sub-folder (an export's hookpoint)."""
  path = Path(path)
  if (path / "cfg.json").exists():
    return path
  subs = sorted(p for p in path.glob("*/cfg.json"))
  if len(subs) == 1:
    return subs[0].parent
  if not subs:
    raise DictionaryError(f"{path} holds no dictionary (no cfg.json in it or in a sub-folder)")
  raise DictionaryError(f"{path} holds several dictionaries ({[p.parent.name for p in subs]}); "
                        "name the hookpoint folder")


# Options of the other libraries that change what the latents are and that fixed TopK weights
# cannot express: refused rather than loaded wrong. Values are why, for the error.
_SPARSIFY_REFUSED = {
    "transcode": "a transcoder predicts a module's output from its input (and skips b_dec on the "
                 "input), it does not reconstruct its input",
    "skip_connection": "its reconstruction adds a dense W_skip x that a sparse code cannot carry",
    "signed": "legacy signed TopK keeps the k largest |pre-activations| with their sign, no ReLU",
}
_SAELENS_NORMALIZATION = {
    "expected_average_only_in": "the weights expect inputs scaled by a factor that cfg.json "
                                "does not hold; fold it in SAELens "
                                "(fold_activation_norm_scaling_factor)",
    "covariance_whitening": "the weights expect whitened inputs; fold the whitening in SAELens "
                            "(fold_activation_whitening)",
    "constant_norm_rescale": "each input is scaled to norm sqrt(d_in) and its output scaled back, "
                             "per token, which fixed weights cannot express",
    "layer_norm": "each input is standardised and its output de-standardised, per token, which "
                  "fixed weights cannot express",
}


def _check_sparsify_cfg(folder: Path, cfg: dict) -> None:
  for option, why in _SPARSIFY_REFUSED.items():
    if cfg.get(option):
      raise DictionaryError(f"{folder}/cfg.json: {option}={cfg[option]!r} is not supported: {why}")
  if cfg.get("activation", "topk") != "topk":
    raise DictionaryError(f"{folder}/cfg.json: activation={cfg['activation']!r} is not supported: "
                          "only 'topk' (groupmax takes the max of each of k groups of latents)")


def _check_saelens_cfg(folder: Path, cfg: dict) -> None:
  if cfg.get("architecture") not in ("topk", "jumprelu"):
    raise DictionaryError(f"{folder}/cfg.json: architecture {cfg.get('architecture')!r} is not "
                          "'topk' or 'jumprelu'")
  norm = cfg.get("normalize_activations", "none")
  if norm not in ("none", None, False):  # SAELens < 6 wrote a bool: True = expected_average_only_in
    why = _SAELENS_NORMALIZATION.get("expected_average_only_in" if norm is True else norm,
                                     "an input normalisation this reader does not know")
    raise DictionaryError(f"{folder}/cfg.json: normalize_activations={norm!r} is not supported: "
                          f"{why}")


def _load_tensors(file: Path, expected: set[str]) -> dict[str, np.ndarray]:
  tensors = load_file(str(file))
  if set(tensors) != expected:
    raise DictionaryError(f"{file}: unexpected tensors {sorted(set(tensors) - expected)}, "
                          f"missing {sorted(expected - set(tensors))}")
  return tensors


def fold_decoder_norms(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """SAELens's rescale_acts_by_decoder_norm as plain TopK weights with unit decoder rows.

  SAELens multiplies pre-activation i by |W_dec_i| before TopK and divides z_i by it before
  decoding. Scaling encoder row i and b_enc_i by |W_dec_i| and W_dec_i by its inverse gives the
  same latents and reconstruction (SAELens's own fold_W_dec_norm, with its 1e-8 floor).
  """
  p = {name: v.astype(np.float64) for name, v in params.items()}
  norms = np.maximum(np.linalg.norm(p["W_dec"], axis=1), 1e-8)
  folded = {"W_enc": p["W_enc"] * norms[:, None], "b_enc": p["b_enc"] * norms,
            "W_dec": p["W_dec"] / norms[:, None], "b_dec": p["b_dec"]}
  return {name: v.astype(np.float32) for name, v in folded.items()}


def fold_input_bias(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """SAELens's apply_b_dec_to_input=false (Gemma Scope: pre = W_enc x + b_enc) in our form:
  W_enc x + b_enc = W_enc (x - b_dec) + (b_enc + W_enc b_dec), the sum taken in float64."""
  b_enc = params["b_enc"].astype(np.float64) + params["W_enc"].astype(np.float64) @ params["b_dec"]
  return {**params, "b_enc": b_enc.astype(np.float32)}


def read(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
  """Reads a sparsify- or SAELens-layout dictionary into our float32 latent-major parameters.

  Options of those libraries that change the latents are folded in exactly or refused by name.
  Returns (params, info) where info has architecture ("topk" | "jumprelu"), k (None for a
  JumpReLU), d_in, num_latents, layout, hookpoint, folder and the sidecar. A JumpReLU's params
  also hold its threshold [n].
  """
  folder = find_dictionary(path)
  cfg = json.loads((folder / "cfg.json").read_text())
  layout = layout_of(folder)
  if layout is None:
    raise DictionaryError(f"{folder} has cfg.json but neither sae.safetensors (sparsify) nor "
                          "sae_weights.safetensors (SAELens)")
  architecture = "topk"
  if layout == "sparsify":
    _check_sparsify_cfg(folder, cfg)
    t = _load_tensors(folder / WEIGHTS[layout], TENSORS[layout])
    params = {"W_enc": t["encoder.weight"], "b_enc": t["encoder.bias"], "W_dec": t["W_dec"],
              "b_dec": t["b_dec"]}
  else:
    _check_saelens_cfg(folder, cfg)
    architecture = cfg["architecture"]
    extra = {THRESHOLD} if architecture == "jumprelu" else set()
    t = _load_tensors(folder / WEIGHTS[layout], TENSORS[layout] | extra)
    params = {"W_enc": t["W_enc"].T, "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"],
              **{name: t[name] for name in extra}}
  k = cfg.get("k") if architecture == "topk" else None
  if architecture == "topk" and (not isinstance(k, int) or k <= 0):
    raise DictionaryError(f"{folder}/cfg.json: k must be a positive integer, got {k!r}")
  params = {name: np.ascontiguousarray(np.asarray(v).astype(np.float32))
            for name, v in params.items()}
  n, d = _check_shapes(params)
  if layout == "saelens" and not cfg.get("apply_b_dec_to_input", True):
    params = fold_input_bias(params)
  # SAELens's JumpReLU has no decoder-norm rescaling (its config drops the key): only TopK's.
  if architecture == "topk" and layout == "saelens" and cfg.get("rescale_acts_by_decoder_norm"):
    params = fold_decoder_norms(params)
  sidecar_path = folder / SIDECAR
  sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.exists() else {}
  recorded = recorded_hookpoint(cfg, sidecar)
  check_hookpoint(folder, recorded)
  # Without metadata (a foreign sparsify export) the folder name is the hookpoint, as in sparsify.
  return params, {"architecture": architecture, "k": k, "d_in": d, "num_latents": n,
                  "layout": layout, "hookpoint": recorded or folder.name, "folder": str(folder),
                  "sidecar": sidecar}
