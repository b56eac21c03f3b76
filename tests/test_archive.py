"""The reject archive: files and overlays, sampling, oldest-first quota cleanup, shedding under load."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from musc_edge.edge.archive import RejectArchive, archive_stem, parse_archive_name
from musc_edge.edge.record import PartRecord, Reason, Verdict

DAY = 86_400.0
T0 = 1_778_284_800.0   # 2026-05-09 00:00:00 UTC


def make_part(part_id: str, capture_time: float = T0 + 0.25, verdict: Verdict = Verdict.REJECT,
              reason: Reason = Reason.ANOMALY, image: np.ndarray | None = None,
              with_map: bool = False) -> PartRecord:
    part = PartRecord(part_id, "recipe", capture_time).decide(verdict, reason)
    part.image = image if image is not None else np.full((24, 32, 3), (10, 120, 240), np.uint8)
    if with_map:
        part.anomaly_map = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
        part.score, part.threshold = 0.8, 0.5
    return part


def archived_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def png_size(image: np.ndarray) -> int:
    return len(cv2.imencode(".png", image[..., ::-1])[1])


@pytest.mark.timeout(30)
def test_reject_is_written_with_overlay_and_a_replayable_name(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    with RejectArchive(tmp_path, quota_bytes=10**7) as archive:
        assert archive.submit(make_part("lot7/p 17", T0 + 3723.456, image=image, with_map=True))
    files = archived_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == [
        "2026-05-09/20260509T010203.456Z_lot7-p-17_REJECT_anomaly.png",
        "2026-05-09/20260509T010203.456Z_lot7-p-17_REJECT_anomaly_overlay.jpg"]
    saved = cv2.imread(str(files[0]), cv2.IMREAD_UNCHANGED)[..., ::-1]
    np.testing.assert_array_equal(saved, image)   # lossless and in RGB order
    overlay = cv2.imread(str(files[1]))[..., ::-1]
    assert overlay.shape == image.shape and not np.array_equal(overlay, image)
    name = parse_archive_name(files[1].name)
    assert (name.part_id, name.verdict, name.reason) == ("lot7-p-17", Verdict.REJECT, Reason.ANOMALY)
    assert name.overlay
    assert name.capture_time == pytest.approx(T0 + 3723.456)
    counters = archive.counters()
    assert (counters.saved, counters.dropped, counters.failed, counters.queued) == (1, 0, 0, 0)
    assert counters.bytes == sum(p.stat().st_size for p in files)


@pytest.mark.parametrize("verdict, reason", [(Verdict.NO_VERDICT, Reason.DECODE_ERROR),
                                             (Verdict.ACCEPT, Reason.OK), (Verdict.REJECT, Reason.TEST_FIRE)])
def test_names_round_trip(verdict: Verdict, reason: Reason) -> None:
    date, stem = archive_stem("a_b", T0 + 59.9996, verdict, reason)
    assert date == "2026-05-09"
    name = parse_archive_name(stem + ".jpg")
    assert (name.part_id, name.verdict, name.reason, name.overlay) == ("a_b", verdict, reason, False)
    assert name.capture_time == pytest.approx(T0 + 59.999)
    assert parse_archive_name("notes.txt") is None


@pytest.mark.timeout(30)
def test_only_rejects_by_default_and_even_samples_of_the_rest(tmp_path: Path) -> None:
    with RejectArchive(tmp_path / "default", quota_bytes=10**7) as archive:
        queued = [archive.submit(make_part(f"p{i}", verdict=v, reason=r)) for i, (v, r) in enumerate(
            [(Verdict.ACCEPT, Reason.OK), (Verdict.NO_VERDICT, Reason.WARMUP), (Verdict.REJECT, Reason.ANOMALY)])]
    assert queued == [False, False, True]
    with RejectArchive(tmp_path / "sampled", quota_bytes=10**7, accepted_fraction=0.25,
                       no_verdict_fraction=1.0) as archive:
        accepted = [archive.submit(make_part(f"ok{i}", T0 + i, Verdict.ACCEPT, Reason.OK)) for i in range(8)]
        assert archive.submit(make_part("warm", verdict=Verdict.NO_VERDICT, reason=Reason.WARMUP))
    assert accepted == [False, False, False, True] * 2
    assert archive.counters().saved == 3


@pytest.mark.timeout(30)
def test_undecodable_frame_keeps_its_raw_bytes(tmp_path: Path) -> None:
    part = make_part("broken", verdict=Verdict.NO_VERDICT, reason=Reason.DECODE_ERROR)
    part.image, part.raw = None, b"\x89PNG truncated"
    with RejectArchive(tmp_path, quota_bytes=10**7, no_verdict_fraction=1.0) as archive:
        archive.submit(part)
    (only,) = archived_files(tmp_path)
    assert only.name.endswith("_broken_NO-VERDICT_decode-error.raw") and only.read_bytes() == part.raw


@pytest.mark.timeout(30)
def test_quota_deletes_oldest_first_also_across_restarts(tmp_path: Path) -> None:
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    size = png_size(image)
    # parts spread over three days, submitted in capture order
    times = [T0 + day * DAY + i for day in range(3) for i in range(3)]
    with RejectArchive(tmp_path, quota_bytes=3 * size + size // 2) as archive:
        for i, t in enumerate(times):
            archive.submit(make_part(f"p{i}", t, image=image))
    assert [parse_archive_name(p.name).part_id for p in archived_files(tmp_path)] == ["p6", "p7", "p8"]
    counters = archive.counters()
    assert (counters.saved, counters.deleted, counters.bytes) == (9, 6, 3 * size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2026-05-11"]   # emptied date folders are removed

    (tmp_path / "2026-05-11" / "leftover.png.partial").write_bytes(b"half a file")
    (tmp_path / "operator-notes.txt").write_text("not ours")
    with RejectArchive(tmp_path, quota_bytes=2 * size) as archive:
        archive.submit(make_part("p9", times[-1] + 1, image=image))
    assert [p.name for p in archived_files(tmp_path)] == [
        "20260511T000002.000Z_p8_REJECT_anomaly.png", "20260511T000003.000Z_p9_REJECT_anomaly.png",
        "operator-notes.txt"]
    assert archive.counters().deleted == 2


@pytest.mark.timeout(30)
def test_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    archive = RejectArchive(tmp_path, quota_bytes=10**7, queue_size=4, autostart=False)   # worker not draining
    queued = [archive.submit(make_part(f"p{i}", T0 + i)) for i in range(10)]
    assert queued == [True] * 4 + [False] * 6
    counters = archive.counters()
    assert (counters.dropped, counters.queued, counters.saved) == (6, 4, 0)
    archive.close()   # starts the worker and flushes what was queued
    counters = archive.counters()
    assert (counters.saved, counters.dropped, counters.queued) == (4, 6, 0)
    assert len(archived_files(tmp_path)) == 4
    with pytest.raises(RuntimeError, match="closed"):
        archive.submit(make_part("late"))


@pytest.mark.timeout(30)
def test_a_bad_item_is_counted_and_the_worker_goes_on(tmp_path: Path) -> None:
    with RejectArchive(tmp_path, quota_bytes=10**7) as archive:
        archive.submit(make_part("bad", image=np.zeros((0, 0, 3), np.uint8)))
        archive.submit(make_part("good", T0 + 1))
    counters = archive.counters()
    assert (counters.failed, counters.saved) == (1, 1)
    assert [parse_archive_name(p.name).part_id for p in archived_files(tmp_path)] == ["good"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(quota_bytes=0), "quota_bytes"),
    (dict(quota_bytes=1, queue_size=0), "queue_size"),
    (dict(quota_bytes=1, image_format="bmp"), "'bmp'"),
    (dict(quota_bytes=1, accepted_fraction=1.5), "accepted_fraction"),
])
def test_bad_settings_are_refused_with_their_name(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RejectArchive(tmp_path, **kwargs)
