"""The `lmms_eval.models` entry point of the `lmms` extra: tells lmms-eval's model registry that
`--model llava_sae` is eval.models.lmms_model.LlavaSae, without importing it (lmms-eval imports a
model's module only when that model is asked for)."""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="llava_sae", chat_class_path="eval.models.lmms_model.LlavaSae")
