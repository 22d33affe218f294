"""What publishing an export folder needs: a SAELens registry entry and a Hugging Face model card.

EXPORT/pretrained_saes.yaml holds the entry for SAELens's own sae_lens/pretrained_saes.yaml (the
release, the Hugging Face repo the folder is uploaded to, and one `saes` item per dictionary, path
= its folder), so that `SAE.from_pretrained(release, hookpoint)` loads it. EXPORT/README.md is the
card: every dictionary's architecture, size, FVU / L0 / dead fraction at the end of training, the
model, layer and hookpoint it was trained on, the evaluation numbers recorded with it, and its
training config. Both are rebuilt from the sidecars (sae_jax.json) of all SAELens-layout
dictionaries in EXPORT, so exporting several hookpoints into one folder lists them all.
"""

from __future__ import annotations

import json
from pathlib import Path

from sae_jax.formats import dictionary
from sae_jax.files import atomic_write_bytes

REGISTRY_FILE = "pretrained_saes.yaml"
CARD_FILE = "README.md"


def _sidecars(export: Path) -> dict[str, dict]:
  """hookpoint folder -> sidecar, for the SAELens-layout dictionaries written by sae_jax.export."""
  found = {}
  for folder in sorted(p for p in export.iterdir() if p.is_dir()):
    sidecar = folder / dictionary.SIDECAR
    if dictionary.layout_of(folder) == "saelens" and sidecar.exists():
      found[folder.name] = json.loads(sidecar.read_text())
  return found


def summary_numbers(sidecar: dict) -> dict:
  """FVU, L0 and dead fraction at the end of training (a BatchTopK run's at its inference
  threshold, what the export computes)."""
  metrics = sidecar.get("metrics") or {}
  pick = lambda *names: next((metrics[n] for n in names if metrics.get(n) is not None), None)
  return {"fvu": pick("inference_fvu", "fvu"), "l0": pick("inference_l0", "l0"),
          "dead_fraction": pick("dead_fraction"), "step": sidecar.get("step")}


def _yaml_str(value) -> str:
  return json.dumps(str(value))  # a JSON string is a YAML double-quoted scalar


def registry_entry(release: str, repo_id: str, sidecars: dict[str, dict]) -> str:
  models = {(s.get("source") or {}).get("model") for s in sidecars.values()}
  if len(models) != 1:
    raise dictionary.DictionaryError(f"one release is one model; the dictionaries of this folder "
                                     f"come from {sorted(map(str, models))}: export them into "
                                     "separate folders")
  lines = [f"{release}:", f"  repo_id: {_yaml_str(repo_id)}", f"  model: {_yaml_str(models.pop())}",
           "  saes:"]
  for folder, sidecar in sidecars.items():
    numbers = summary_numbers(sidecar)
    lines += [f"  - id: {_yaml_str(folder)}", f"    path: {_yaml_str(folder)}"]
    if numbers["l0"] is not None:
      lines.append(f"    l0: {float(numbers['l0'])!r}")
    if numbers["fvu"] is not None:
      lines.append(f"    variance_explained: {round(1.0 - float(numbers['fvu']), 6)!r}")
  return "\n".join(lines) + "\n"


def _number(value) -> str:
  return "—" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))


def card(release: str, repo_id: str, sidecars: dict[str, dict]) -> str:
  first = next(iter(sidecars.values()))
  model = (first.get("source") or {}).get("model")
  out = ["---", "library_name: saelens", f"base_model: {_yaml_str(model)}",
         "tags: [sparse-autoencoder, saelens, llava-sae]", "---", "",
         f"# {release}", "",
         f"Sparse autoencoders on the activations of {model}, trained with llava-sae (sae_jax).",
         "", "```python", "from sae_lens import SAE",
         f"sae = SAE.from_pretrained({release!r}, {next(iter(sidecars))!r})",
         f"# before SAELens lists the release: SAE.from_pretrained({repo_id!r}, <id>)", "```", "",
         "| id | architecture | latents | k | layer | hookpoint | FVU | L0 | dead fraction "
         "| step |", "|---|---|---|---|---|---|---|---|---|---|"]
  for folder, sidecar in sidecars.items():
    sae, source = sidecar.get("sae") or {}, sidecar.get("source") or {}
    numbers = summary_numbers(sidecar)
    cells = [folder, sae.get("architecture", "topk"), sae.get("num_latents"), sae.get("k"),
             source.get("layer"), source.get("hookpoint"),
             *(_number(numbers[n]) for n in ("fvu", "l0", "dead_fraction", "step"))]
    out.append("| " + " | ".join(map(str, cells)) + " |")
  out += ["", "FVU, L0 and dead fraction are the trainer's at the exported step (BatchTopK: at its "
          "inference threshold).", ""]
  for folder, sidecar in sidecars.items():
    source = sidecar.get("source") or {}
    out += [f"## {folder}", "", f"Harvest: model {source.get('model')}, layer "
            f"{source.get('layer')}, hookpoint {source.get('hookpoint')}, store "
            f"{source.get('store')}, token kinds {source.get('token_kinds')}.", ""]
    for name, numbers in (sidecar.get("evals") or {}).items():
      out += [f"Evaluation `{name}`:", "", "```json", json.dumps(numbers, indent=1), "```", ""]
    out += ["Training config:", "", "```json",
            json.dumps({"sae": sidecar.get("sae"), "flags": sidecar.get("training_flags"),
                        "input_scale_folded": sidecar.get("input_scale_folded")}, indent=1),
            "```", ""]
  return "\n".join(out)


def write(export: str | Path, release: str, repo_id: str) -> None:
  export = Path(export)
  sidecars = _sidecars(export)
  if not sidecars:
    return
  atomic_write_bytes(export / REGISTRY_FILE, registry_entry(release, repo_id, sidecars).encode())
  atomic_write_bytes(export / CARD_FILE, card(release, repo_id, sidecars).encode())
