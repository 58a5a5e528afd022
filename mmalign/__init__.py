"""mmalign: MiniGPT-4-family vision-language chat models on Hugging Face-native classes.

Importing the package registers the `minigpt4_patch` architecture with transformers' Auto
classes, so `AutoModelForImageTextToText.from_pretrained` loads every folder mmalign writes.
"""

from mmalign import model  # noqa: F401  (registration side effect)

__version__ = "0.1.0"
