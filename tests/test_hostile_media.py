"""The one image I/O layer (edge_app/mediaio.py) against hostile files: headers read without decoding,
truncation, the pixel budget, and the same rules for sources, seeding and evaluation."""
from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

from musc_edge.edge.evaluation.datasets import DatasetError, read_image as dataset_image
from musc_edge.edge.mediaio import (HARD_MAX_PIXELS, MediaError, decode_image, declared_size, pixel_budget_problem,
                              read_image, truncation)
from musc_edge.edge.sources.base import SourceConfigError, make_source

from .hostile import png_declaring


def encoded(suffix: str, shape=(30, 50, 3), dtype=np.uint8) -> bytes:
    return cv2.imencode(suffix, np.random.default_rng(0).integers(0, 255, shape).astype(dtype))[1].tobytes()


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp"])
def test_every_format_declares_its_size_and_decodes_to_rgb(suffix, tmp_path):
    data = encoded(suffix)
    assert declared_size(data) == (30, 50)
    (tmp_path / f"x{suffix}").write_bytes(data)
    image = read_image(tmp_path / f"x{suffix}")
    assert image.shape == (30, 50, 3) and image.dtype == np.uint8
    assert np.array_equal(dataset_image(tmp_path / f"x{suffix}"), image)   # evaluation reads the same way


@pytest.mark.parametrize("suffix, cut, message", [(".png", 20, "truncated PNG"), (".jpg", 30, "truncated JPEG"),
                                                  (".bmp", 100, "truncated BMP")])
def test_truncated_files_are_refused_before_decoding(suffix, cut, message):
    data = encoded(suffix)[:-cut]
    assert message in truncation(data)
    with pytest.raises(MediaError, match=message):
        decode_image(data, "cam")


def test_headers_over_the_budget_are_refused_for_every_format():
    bomb = png_declaring(30000, 30000)
    assert "30000 x 30000 = 900.0 MP" in pixel_budget_problem(bomb)
    jpeg = bytearray(encoded(".jpg"))
    sof = next(i for i in range(2, len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] in (0xC0, 0xC2))
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    bmp = bytearray(encoded(".bmp"))
    bmp[18:26] = struct.pack("<ii", 40000, -40000)   # top-down BMPs have a negative height
    for data in (bomb, bytes(jpeg), bytes(bmp)):
        with pytest.raises(MediaError, match="pixel budget"):
            decode_image(data, "cam")
    with pytest.raises(MediaError, match="pixel budget"):
        decode_image(encoded(".png"), "cam", max_pixels=100)


def test_16_bit_files_are_scaled_for_evaluation_and_refused_from_cameras(tmp_path):
    data = encoded(".png", dtype=np.uint16)
    with pytest.raises(MediaError, match="8-bit"):
        decode_image(data, "cam")
    (tmp_path / "deep.png").write_bytes(data)
    assert read_image(tmp_path / "deep.png").dtype == np.uint8


def test_dataset_errors_stay_dataset_errors(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_declaring(30000, 30000))
    with pytest.raises(DatasetError, match="pixel budget"):
        dataset_image(tmp_path / "bomb.png")


def test_source_pixel_budget_is_a_checked_config_key(tmp_path):
    (tmp_path / "a.png").write_bytes(encoded(".png"))
    for bad in (0, -1, HARD_MAX_PIXELS + 1, "many"):
        with pytest.raises(SourceConfigError, match="max_pixels"):
            make_source({"type": "replay", "path": str(tmp_path), "max_pixels": bad})
    source = make_source({"type": "replay", "path": str(tmp_path), "rate": None, "max_pixels": 100})
    with source:
        [part] = list(source.parts())
    from musc_edge.edge.sources.base import DecodeError, decode_part
    with pytest.raises(DecodeError, match="over the pixel budget of 0.0001 MP"):
        decode_part(part)


def test_seeding_reads_bmp_like_every_other_format(tmp_path):
    from musc_edge.edge.runtime.recipes import recipe2d
    from musc_edge.edge.runtime.recipes.base import image_files
    pixels = np.random.default_rng(0).integers(0, 255, (16, 20, 3), dtype=np.uint8)
    for suffix in (".bmp", ".png", ".jpg"):
        cv2.imwrite(str(tmp_path / f"part{suffix}"), pixels)
    assert sorted(p.suffix for p in image_files(tmp_path)) == [".bmp", ".jpg", ".png"]
    assert recipe2d.read_image is read_image                    # the seed reader decodes through mediaio
    assert np.array_equal(read_image(tmp_path / "part.bmp")[..., ::-1], pixels)   # RGB out, BGR written
