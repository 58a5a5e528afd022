"""How long resuming mid-epoch costs per shard: counting a shard's samples from its tar headers
(what ``set_resume`` does for every shard of the rank) against reading it through with
webdataset. Prints both times and their ratio, measured in the same run.

    python bench/shard_scan.py [--samples 10000] [--image-bytes 12000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import webdataset as wds

from mmalign.data.stream import count_shard_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--image-bytes", type=int, default=12000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "00000.tar")
        blob = os.urandom(args.image_bytes)
        with wds.TarWriter(path) as sink:  # img2dataset's layout: key.jpg, key.txt, key.json
            for i in range(args.samples):
                sink.write({"__key__": f"00000{i:04d}", "jpg": blob, "txt": "a caption", "json": {"key": i}})
        sum(1 for _ in wds.tarfile_samples([{"url": path}]))  # warm the page cache
        t = time.perf_counter()
        n_scan = count_shard_samples(path)
        scan = time.perf_counter() - t
        t = time.perf_counter()
        n_read = sum(1 for _ in wds.tarfile_samples([{"url": path}]))
        read = time.perf_counter() - t
    assert n_scan == n_read == args.samples, (n_scan, n_read)
    print(f"shard: {args.samples} samples, ~{args.samples * args.image_bytes / 1e6:.0f} MB")
    print(f"header scan  {scan:.2f} s")
    print(f"webdataset read (no decode)  {read:.2f} s")
    print(f"ratio read / scan: {read / scan:.1f}x")


if __name__ == "__main__":
    main()
