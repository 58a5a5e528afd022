"""Data: sources read from files (bad records counted and skipped) and batching."""

from mmalign.data.collate import collate, left_pad
from mmalign.data.sources import (
    CaptionRecord,
    ConversationRecord,
    MultimodalDataset,
    SkipCounter,
    load_image,
    make_caption_encoder,
    make_conversation_encoder,
    read_caption_json,
    read_llava_json,
)

__all__ = [
    "CaptionRecord",
    "ConversationRecord",
    "MultimodalDataset",
    "SkipCounter",
    "collate",
    "left_pad",
    "load_image",
    "make_caption_encoder",
    "make_conversation_encoder",
    "read_caption_json",
    "read_llava_json",
]
