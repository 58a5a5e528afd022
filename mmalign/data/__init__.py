"""Data: sources read from files or streamed from shards (bad records counted and skipped),
mixing, length-grouped sampling and batching."""

from mmalign.data.collate import collate, left_pad
from mmalign.data.sampling import LengthGroupedSampler
from mmalign.data.sources import (
    CaptionRecord,
    ConversationRecord,
    DataError,
    MultimodalDataset,
    SkipCounter,
    encode_sample,
    load_image,
    load_json,
    make_caption_encoder,
    make_conversation_encoder,
    read_caption_json,
    read_llava_json,
)
from mmalign.data.stream import (
    IndexStream,
    MixedStream,
    ShardStream,
    StreamDataset,
    count_shard_samples,
    expand_shards,
    merge_summaries,
    rank_world,
)

__all__ = [
    "CaptionRecord",
    "ConversationRecord",
    "DataError",
    "IndexStream",
    "LengthGroupedSampler",
    "MixedStream",
    "MultimodalDataset",
    "ShardStream",
    "SkipCounter",
    "StreamDataset",
    "collate",
    "count_shard_samples",
    "encode_sample",
    "expand_shards",
    "left_pad",
    "load_image",
    "load_json",
    "make_caption_encoder",
    "make_conversation_encoder",
    "merge_summaries",
    "rank_world",
    "read_caption_json",
    "read_llava_json",
]
