"""Regenerates the small files in this folder (Pillow, NumPy, SciPy): a CMYK JPEG as Pillow writes
it (Adobe, inverted CMYK), a grayscale JPEG, and MAT-5 files written by SciPy shaped like the
Stanford Cars devkit, compressed and not. Run: python make_test_data.py"""
from PIL import Image
import numpy as np
import scipy.io as sio

# CMYK JPEG: left half pure red, right half pure blue (as RGB).
rgb = np.zeros((16, 32, 3), np.uint8)
rgb[:, :16] = (255, 0, 0)
rgb[:, 16:] = (0, 0, 255)
Image.fromarray(rgb).convert("CMYK").save("cmyk.jpg", quality=95)

# Grayscale JPEG: a horizontal ramp 0, 8, ..., 248.
Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (8, 1))).save("gray.jpg", quality=95)

# Struct array `annotations` (integer fields stored as MATLAB would: uint8/uint16/double) and a
# `class_names` cell array.
dt = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
annos = np.zeros((1, 3), dtype=dt)
rows = [(39, 116, 569, 375, 14, "00001.jpg"), (36, 116, 868, 587, 3, "00002.jpg"),
        (85, 109, 601, 381, 196, "sub dir/00003.jpg")]
for i, (a, b, c, d, k, f) in enumerate(rows):
    annos[0, i] = (np.array([[a]], np.uint8), np.array([[b]], np.uint16), np.array([[c]], np.uint16),
                   np.array([[d]], np.float64), np.array([[k]], np.uint8), np.array([f]))
names = np.empty((1, 2), dtype=object)
names[0, 0] = "AM General Hummer SUV 2000"
names[0, 1] = "Škoda Octavia/Combi 2012"
sio.savemat("scipy_cars.mat", {"annotations": annos, "class_names": names}, do_compression=True)
sio.savemat("scipy_cars_uncompressed.mat", {"annotations": annos, "class_names": names},
            do_compression=False)

# A cars_meta.mat with 196 class names ("Make<i> Model<i> 2012").
meta = np.empty((1, 196), dtype=object)
for i in range(196):
    meta[0, i] = f"Make{i} Model{i} 2012"
sio.savemat("scipy_cars_meta.mat", {"class_names": meta}, do_compression=True)
