"""mmalign: MiniGPT-4-family vision-language chat models on Hugging Face-native classes.

Importing the package itself is cheap (the CLI's ``--help`` must not wait for torch);
``import mmalign.model`` (which every model-facing part of mmalign does) registers the
``minigpt4_patch`` architecture with transformers' Auto classes, so
``AutoModelForImageTextToText.from_pretrained`` loads every folder mmalign writes.
"""

__version__ = "0.1.0"
