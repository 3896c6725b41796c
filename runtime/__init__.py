"""The network, the expert cache, the tokenizer, chat templates, sampling and generation."""
import os

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# The small demo model shipped in the package (see data/MODEL_CARD.md): `lazymoe demo` and `serve` without a model.
DEMO_MODEL = os.path.join(DATA, "lazymoe-demo-q4_0.gguf")
