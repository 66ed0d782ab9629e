"""Pillow + NumPy baseline of the snapmix-data training pipeline, for `cargo xtask bench-data`.

Per image: decode (Pillow), resize (bilinear; shorter side to --resize keeping the aspect, or
warp to --resize x --resize), random crop --crop, random horizontal flip, ImageNet mean/std
normalisation into a float32 CHW slot of an NCHW batch array. One process per worker (the
usual DataLoader setup). Prints one JSON object: images, seconds, images_per_s, workers.

Usage: python pillow_pipeline.py --list FILES.txt --workers N --images M [--warp]
"""
import argparse
import json
import multiprocessing as mp
import random
import time

import numpy as np
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def transform(path, resize, crop, warp, rng, out):
    image = Image.open(path).convert("RGB")
    cols, rows = image.size
    if warp:
        size = (resize, resize)
    elif rows <= cols:
        size = (int(resize * cols / rows), resize)
    else:
        size = (resize, int(resize * rows / cols))
    image = image.resize(size, Image.BILINEAR)
    left = rng.randint(0, size[0] - crop)
    top = rng.randint(0, size[1] - crop)
    image = image.crop((left, top, left + crop, top + crop))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
    out[...] = (array - MEAN) / STD


def worker(args):
    paths, resize, crop, warp, batch, seed = args
    rng = random.Random(seed)
    buffer = np.empty((batch, 3, crop, crop), np.float32)
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        for slot, path in enumerate(chunk):
            transform(path, resize, crop, warp, rng, buffer[slot])
    return len(paths)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--list", required=True, help="text file, one image path per line")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--images", type=int, default=256, help="images per run (cycling the list)")
    parser.add_argument("--resize", type=int, default=512)
    parser.add_argument("--crop", type=int, default=448)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warp", action="store_true")
    args = parser.parse_args()
    with open(args.list) as f:
        files = [line.strip() for line in f if line.strip()]
    paths = [files[i % len(files)] for i in range(args.images)]
    shards = [(paths[w::args.workers], args.resize, args.crop, args.warp, args.batch, w)
              for w in range(args.workers)]
    with mp.Pool(args.workers) as pool:
        pool.map(worker, [(s[0][:2], *s[1:]) for s in shards])  # warm-up: imports, caches
        start = time.perf_counter()
        done = sum(pool.map(worker, shards))
        seconds = time.perf_counter() - start
    print(json.dumps({"images": done, "seconds": seconds, "images_per_s": done / seconds,
                      "workers": args.workers}))


if __name__ == "__main__":
    main()
