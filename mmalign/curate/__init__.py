"""Data curation: make the stage-2 data, not only train on it.

MiniGPT-4's self-curated set and ShareGPT4V-style re-captioning as resumable steps
(``mmalign curate <step> CONFIG``): ``describe`` (the stage-1 model describes each image, asked
``Continue`` when short) -> ``fix`` (an LLM repairs the text with the paper's instruction) ->
``filter`` (named rules) -> ``review`` (a web page; SQLite decisions) -> ``export``
(``cc_sbu_align`` + LLaVA JSON + the funnel), and ``recaption`` (webdataset shards in, shards
with a new caption out, split by rank). State: ``store`` (one append-only JSONL per step and
rank). See docs/curate.md.
"""
