"""GenICam cameras (GigE Vision, USB3 Vision) through Aravis 0.8: ``source: {type: genicam, camera: ...}``.

``camera`` is what Aravis opens: a device id (``Basler-21234567``), a serial number or, for GigE Vision, an
IP address. ``open()`` sets the features a line needs from the config (pixel format, exposure, gain, ROI,
frame rate, trigger, GigE packet size and delay, then any ``features`` by name), and streams into a bounded
pool of ``buffers`` buffers: each frame's pixels are copied out and its buffer handed straight back, so a
slow consumer never holds the camera's pool. Every frame becomes one part:

* its image is the frame converted to RGB (edge_app/sources/pixel_formats.py);
* ``source_ref`` is ``genicam://<camera>/<frame id>?timestamp_ns=<camera timestamp>`` (:func:`frame_ref`);
* ``encoder`` is the chunk ``encoder_chunk`` (``Chunk<name>``) where the camera sends chunk data, else the
  count handed to :meth:`GenICamSource.trigger`;
* ``capture_time`` is the trigger instant (software trigger) or the host's arrival stamp of the frame;
* with ``multipart: true`` (GigE Vision multi-part, 3D cameras), ``cloud`` is the buffer's ``Coord3D_ABC32f``
  component paired with its 2D image (:func:`pair_components`).

A software trigger is sent to the camera at once, from the thread that calls :meth:`GenICamSource.trigger`
(the photo eye's instant is the exposure's, and triggers reach the camera as far apart as they came).
Triggers are matched to frames in order, frame ids keeping the places of frames still owed: a frame that
arrives while an earlier id is missing takes the trigger after the one that id keeps, and the missing id's
part (late frame or NO_VERDICT) gets the trigger it kept. A trigger the camera did not take leaves no id gap;
the frame's timestamp shows it (:func:`answered_trigger`), and its part is a NO_VERDICT.

Faults become parts or alarms, never silence: an incomplete buffer (GigE packet loss) is a part whose decode
fails with the buffer status (NO_VERDICT, decode_error); a frame-id gap gives one such part per missing
frame id (up to ``max_gap_rows``, beyond that an alarm); a software trigger with no frame within
``frame_timeout_s`` is a NO_VERDICT part; a camera that stops answering (control lost, or no frame and no
reply to a register read) raises an alarm, its waiting triggers become NO_VERDICT parts, and the source
reopens it every ``reconnect_interval_s`` until it answers again (another alarm), on its own.

Aravis comes from the system (Debian/Ubuntu ``gir1.2-aravis-0.8``) and is reached through PyGObject
(``pip install 'musc-edge[genicam]'``, or a venv made with ``--system-site-packages`` beside ``python3-gi``).
The config validates without either; ``open()`` names what is missing.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import numpy as np

from ..record import PartRecord, Reason, Verdict
from .base import FrameSource, SourceError, UndecodableFrame
from .configs import GENICAM_TRIGGER_MODES, TRIGGER_ACTIVATIONS, GenICamConfig  # noqa: F401  (re-exported)
from .pixel_formats import FORMATS, PixelFormatError, is_coord3d, to_cloud, to_rgb

log = logging.getLogger(__name__)

TRIGGER_MODES = GENICAM_TRIGGER_MODES
GEV_FRAME_ID_MAX = 0xFFFF          # GigE Vision 1.x block ids count 1..65535 and wrap to 1 (0 is never used)
_WRAP_SLACK = 0x100                # a fall from within this of the top to within this of 1 is a wrap
UNKNOWN_FRAME_ID = 0               # in a frame ref: an incomplete frame whose id is not known yet
_PROBE_REGISTER = 0x0000           # GigE Vision bootstrap "Version": a read-only register every camera has
INSTALL_HINT = ("install Debian/Ubuntu's gir1.2-aravis-0.8 and PyGObject in this venv "
                "(pip install 'musc-edge[genicam]', build deps libgirepository1.0-dev libcairo2-dev), "
                "or create the venv with --system-site-packages beside python3-gi")


def aravis() -> tuple[Any, Any]:
    """``(Aravis, GLib)`` from PyGObject; ``SourceError`` saying what to install when either is missing."""
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis, GLib
    except (ImportError, ValueError) as exc:
        raise SourceError(f"GenICam needs Aravis 0.8 through PyGObject ({exc}); {INSTALL_HINT}") from None
    return Aravis, GLib


def aravis_missing() -> str | None:
    """Why Aravis cannot be used from this interpreter, or None when it can."""
    try:
        aravis()
    except SourceError as exc:
        return str(exc)
    return None


def frame_ref(camera: str, frame_id: int, timestamp_ns: int) -> str:
    """The ``source_ref`` of a GenICam frame: ``genicam://<camera>/<frame id>?timestamp_ns=<t>``."""
    return f"genicam://{quote(camera, safe='')}/{frame_id}?timestamp_ns={timestamp_ns}"


def parse_frame_ref(ref: str) -> tuple[str, int, int] | None:
    """``(camera, frame id, camera timestamp ns)`` of a :func:`frame_ref`, or None for any other ref."""
    parts = urlsplit(ref or "")
    if parts.scheme != "genicam" or not parts.path.strip("/").isdigit():
        return None
    stamp = parse_qs(parts.query).get("timestamp_ns", ["-1"])[0]
    return unquote(parts.netloc), int(parts.path.strip("/")), int(stamp) if stamp.lstrip("-").isdigit() else -1


class FrameIdTracker:
    """Frame-id continuity of one camera connection: which frames never arrived, and when ids restarted.

    Two things of GigE Vision streams shape it. Ids may arrive out of order: Aravis hands an incomplete frame
    over when its retention time (100 ms by default) ends, after newer complete frames; so a skipped id is
    only *pending* until ``gap_timeout_s`` after a later id showed the gap (:meth:`overdue`). And the id an
    incomplete frame carries is not reliable (0, or the buffer's previous id, when the leader packet was
    lost): such a frame still stands for one frame, so it settles one pending id (the oldest), or, before
    the gap shows, one that the next gap will open (for ``gap_timeout_s``).

    After each :meth:`observe`, ``position`` is how many frames still owed were due before this one (the
    pending ids older than it): a software-triggered frame belongs to that many triggers after the oldest
    waiting one, the owed frames' triggers staying with their ids. ``recorded_as`` is the id the frame is
    recorded under: its own, or for an incomplete frame whose id is not, the owed id it settled; None when it
    settles one that a later gap will show (its id is not known, and its stale id belongs to another frame).
    """

    def __init__(self, gap_timeout_s: float = 0.5) -> None:
        self.gap_timeout_s = gap_timeout_s
        self.last: int | None = None
        self.pending: dict[int, float] = {}             # id -> when a later id showed it was skipped
        self.credits: deque[float] = deque()            # arrival times of incomplete frames of unknown id
        self.given_up: deque[int] = deque(maxlen=1024)  # ids already reported missing
        self.position = 0
        self.recorded_as: int | None = None

    def reset(self) -> None:
        """Forget everything (a new connection: the camera's counter may start again)."""
        self.last = None
        self.pending.clear()
        self.credits.clear()

    def observe(self, frame_id: int, now: float, complete: bool = True) -> str | None:
        """Record a frame that arrived at monotonic time ``now``; an alarm text, or None.

        Ids wrap 65535 -> 1 as in GigE Vision 1.x. A complete frame whose id is repeated or decreasing, and
        neither pending nor a wrap, is a restart of the camera's counter: an alarm, no ids taken as missing.
        """
        self.position, self.recorded_as = 0, frame_id
        if frame_id in self.pending:                     # late, but in time
            self.position = list(self.pending).index(frame_id)
            del self.pending[frame_id]
            return None
        if not complete and not self._follows(frame_id):
            self.credits.append(now)                     # stands for the oldest frame owed
            settled = self._settle()
            self.recorded_as = None if self.credits else settled[-1]   # this frame's credit is the newest
            return None
        if frame_id in self.given_up:
            return f"frame id {frame_id} arrived after it was reported missing"
        last, self.last = self.last, frame_id
        self.position = len(self.pending)                # every id still owed is older than this one
        if last is None or frame_id == last + 1:
            return None
        if frame_id > last:
            skipped = range(last + 1, frame_id)
        elif self._wraps(last, frame_id):
            skipped = [*range(last + 1, GEV_FRAME_ID_MAX + 1), *range(1, frame_id)]
        else:
            return f"frame ids restarted at {frame_id} after {last} (camera reset or a second stream)"
        self.pending.update((i, now) for i in skipped)
        self._settle()
        self.position = len(self.pending)
        return None

    def overdue(self, now: float) -> list[int]:
        """Pending ids given up at ``now``, oldest first (in the order the camera made them); each reported once."""
        while self.credits and now - self.credits[0] >= self.gap_timeout_s:
            self.credits.popleft()
        late = [i for i, since in self.pending.items() if now - since >= self.gap_timeout_s]
        for i in late:
            del self.pending[i]
        self.given_up.extend(late)
        return late

    def _follows(self, frame_id: int) -> bool:
        """Whether an incomplete frame's id is plausibly its own: shortly after the last complete one."""
        if self.last is None:
            return False
        return 0 < frame_id - self.last <= _WRAP_SLACK or self._wraps(self.last, frame_id)

    @staticmethod
    def _wraps(last: int, frame_id: int) -> bool:
        return GEV_FRAME_ID_MAX - _WRAP_SLACK < last <= GEV_FRAME_ID_MAX and 0 < frame_id < _WRAP_SLACK

    def _settle(self) -> list[int]:
        """Owed ids settled by waiting incomplete frames, oldest first (each by the oldest credit)."""
        settled = []
        while self.credits and self.pending:
            self.credits.popleft()
            settled.append(next(iter(self.pending)))
            del self.pending[settled[-1]]
        return settled


def answered_trigger(sent_utc: Sequence[float], arrival_utc: float, stamp_s: float | None,
                     usual_delay_s: float | None) -> int:
    """Which of the waiting software triggers (``sent_utc``: host clock, oldest first) a frame answers.

    A camera does not take every trigger: not one right after acquisition starts, nor one closer to the last
    than it can expose and read out. Taken in order, each later frame would then answer the trigger before
    its own for as long as the line runs (its part id, encoder count and reject timing one part early). So:
    a trigger sent after the frame arrived (``arrival_utc``) is not its own; of the others, the frame
    answers the one whose delay to the frame's timestamp (``stamp_s``, the camera's clock) is nearest the
    usual one (``usual_delay_s``, from the last frames); the first frame of a connection, with no usual
    delay yet, answers the newest trigger sent before it arrived (right after acquisition starts, a camera is
    likelier to have skipped a trigger than to take longer than a part's pitch to send its frame; triggers
    closer together than one frame's round trip are the one case this gets wrong, and only as a connection's
    first frame). The triggers before the one answered were not taken. A frame without a timestamp (an
    incomplete one, or from a camera that stamps none) answers the oldest, as does a frame that arrived
    before every waiting trigger was sent.
    """
    eligible = [i for i, sent in enumerate(sent_utc) if sent <= arrival_utc]
    if not eligible or stamp_s is None:
        return 0
    if usual_delay_s is None:
        return eligible[-1]
    return min(eligible, key=lambda i: abs(stamp_s - sent_utc[i] - usual_delay_s))


@dataclass
class _Trigger:
    part_id: str | None
    encoder: int | None
    mono: float
    utc: float


class GenICamSource(FrameSource):
    """Parts from a GenICam camera through Aravis (see the module docstring). ``on_alarm`` receives alarm
    texts (the line routes them to its alarm path; default: the log)."""

    config: GenICamConfig

    def __init__(self, config: GenICamConfig) -> None:
        super().__init__(config)
        self.on_alarm: Callable[[str], None] = lambda text: log.warning("ALARM: %s", text)
        self._lost_triggers: queue.Queue[_Trigger] = queue.Queue()   # requested while no camera was open
        self._awaiting: deque[_Trigger] = deque()                      # sent, their frames still owed
        self._awaiting_lock = threading.Lock()
        self._delays: deque[float] = deque(maxlen=15)   # camera stamp - trigger instant, of the last frames
        self._camera_lock = threading.Lock()      # trigger() and the streaming thread share the open camera
        self._tracker = FrameIdTracker(config.gap_timeout_s)
        self._camera: Any = None
        self._stream: Any = None
        self._chunks: Any = None
        self._signal: int | None = None
        self._invalid_3d: float | None = None
        self._control_lost = threading.Event()
        self.device_id = config.camera
        # frames: buffers popped; incomplete: of them not complete; missing: ids never arrived; underruns:
        # frames the stream had no free buffer for (Aravis' count, added when a connection closes)
        self.stats = {"frames": 0, "incomplete": 0, "missing": 0, "missed_triggers": 0, "reconnects": 0,
                      "underruns": 0}

    @property
    def finite(self) -> bool:
        """Ends by itself only with ``max_parts``; otherwise only at ``close()``."""
        return self.config.max_parts is not None

    def describe(self) -> str:
        return f"GenICam camera {self.device_id}"

    # -- public ----------------------------------------------------------------------------------------------
    def trigger(self, part_id: str | None = None, encoder: int | None = None) -> None:
        """Request one frame (``trigger: software``): sent to the camera before this returns (one GenICam
        command, about a millisecond on GigE). Thread-safe.

        While the camera is lost (or not open yet) the part is a NO_VERDICT at once. A camera may drop a
        trigger it cannot take (right after acquisition starts, or closer to the last one than it can expose
        and read out): that part is a missed trigger, NO_VERDICT when the next frame shows it was not taken
        (:func:`answered_trigger`), or ``frame_timeout_s`` after it when no frame follows."""
        if self.config.trigger != "software":
            raise SourceError(f"trigger() needs source config trigger='software', not {self.config.trigger!r}")
        _, GLib = aravis()
        request = _Trigger(part_id, encoder, time.monotonic(), time.time())
        with self._camera_lock:
            if self._camera is None:
                self._lost_triggers.put(request)
                return
            with self._awaiting_lock:
                self._awaiting.append(request)     # before the frame can come back
            try:
                self._camera.software_trigger()
            except GLib.Error as exc:
                log.warning("software trigger on %s failed: %s", self.config.camera, exc.message)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _acquire(self) -> None:
        self._open_camera()

    def _release(self) -> None:
        self._close_camera()

    def _open_camera(self) -> None:
        Arv, GLib = aravis()
        c = self.config
        camera = open_camera(c.camera)
        try:
            configure_camera(camera, c)
            if camera.is_gv_device():
                _choose_receive_path(camera, c, Arv)
            stream = camera.create_stream(None, None)
            if camera.is_gv_device():
                _set_stream_options(stream, c, Arv)
            payload = camera.get_payload()
            for _ in range(c.buffers):
                stream.push_buffer(Arv.Buffer.new_allocate(payload))
            self._chunks = camera.create_chunk_parser() if c.encoder_chunk else None
            camera.set_acquisition_mode(Arv.AcquisitionMode.CONTINUOUS)
            camera.start_acquisition()
            self.device_id = camera.get_device_id() or c.camera
        except GLib.Error as exc:
            raise SourceError(f"GenICam camera {c.camera!r}: {exc.message}") from None
        self._invalid_3d = scan3d_invalid_value(camera) if c.multipart else None
        self._control_lost.clear()
        self._signal = camera.get_device().connect("control-lost", lambda *_: self._control_lost.set())
        self._stream = stream
        self._tracker.reset()
        self._delays.clear()       # another connection, maybe another camera clock
        with self._camera_lock:
            self._camera = camera

    def _close_camera(self) -> None:
        with self._camera_lock:     # waits for a trigger in flight
            camera, self._camera = self._camera, None
        stream, self._stream, self._chunks = self._stream, None, None
        if camera is None:
            return
        _, GLib = aravis()
        try:
            self.stats["underruns"] += stream.get_info_uint64_by_name("n_underruns")
        except GLib.Error:
            pass
        try:
            camera.stop_acquisition()
        except GLib.Error as exc:   # the camera is gone: nothing to stop
            log.debug("stop_acquisition on %s: %s", self.config.camera, exc.message)
        if self._signal is not None:
            camera.get_device().disconnect(self._signal)
            self._signal = None
        del stream, camera           # the stream's receiving thread ends with its last reference

    # -- streaming -------------------------------------------------------------------------------------------
    def _iterate(self) -> Iterator[PartRecord]:
        c = self.config
        ids = c.part_ids()
        emitted = 0
        last_sign = time.monotonic()        # last frame, or last successful probe
        lost_at = 0.0
        for record in self._stream_records(ids):
            if record is None:              # a poll with nothing to report: time to check the camera
                now = time.monotonic()
                if self._camera is None:
                    if self._stop.wait(c.reconnect_interval_s) or not self._try_reopen(lost_at):
                        continue
                    last_sign = time.monotonic()
                elif self._control_lost.is_set() or (now - last_sign > c.frame_timeout_s and (
                        c.trigger == "free_run" or not self._answers())):
                    # free run: a camera that answers but streams nothing (its stream taken, its settings
                    # changed by another tool) is reopened, which configures and starts it again
                    why = ("control lost" if self._control_lost.is_set()
                           else f"no frame for {now - last_sign:.1f} s" + ("" if c.trigger == "free_run"
                                                                          else " and no reply"))
                    lost_at = now
                    for orphan in self._lose(why, ids):
                        yield orphan
                        emitted += 1
                    if c.max_parts is not None and emitted >= c.max_parts:
                        return
                elif now - last_sign > c.frame_timeout_s:
                    last_sign = now         # idle but answering (a triggered line between parts)
                continue
            last_sign = time.monotonic()
            yield record
            emitted += 1
            if c.max_parts is not None and emitted >= c.max_parts:
                return

    def _stream_records(self, ids) -> Iterator[PartRecord | None]:
        """Parts as frames arrive; ``None`` after each poll interval without one (and while disconnected)."""
        c = self.config
        timeout_us = int(c.poll_interval_s * 1e6)
        while not self._stop.is_set():
            yield from self._untriggered(ids)
            if self._camera is None:
                yield None
                continue
            yield from self._missed_triggers(ids)
            buffer = self._stream.timeout_pop_buffer(timeout_us)
            if self._stop.is_set():
                if buffer is not None:
                    self._stream.push_buffer(buffer)
                return
            records = []
            if buffer is not None:
                try:
                    records = self._frame_records(buffer, ids)
                finally:
                    self._stream.push_buffer(buffer)
            yield from self._missing_records(ids)
            yield from records
            if buffer is None:
                yield None

    def _untriggered(self, ids) -> Iterator[PartRecord]:
        """Software triggers requested while the camera was lost: their parts, NO_VERDICT, at once."""
        while True:
            try:
                request = self._lost_triggers.get_nowait()
            except queue.Empty:
                return
            self.stats["missed_triggers"] += 1
            yield self._no_frame(ids, request, f"software trigger while camera {self.device_id} is lost")

    def _missed_triggers(self, ids) -> Iterator[PartRecord]:
        while request := self._pop_awaiting(older_than=time.monotonic() - self.config.frame_timeout_s):
            self.stats["missed_triggers"] += 1
            yield self._no_frame(ids, request, f"software trigger got no frame within "
                                               f"{self.config.frame_timeout_s:g} s from camera {self.device_id}")

    def _take_trigger(self, position: int, arrival_utc: float,
                      stamp_s: float | None) -> tuple[_Trigger | None, list[_Trigger]]:
        """The waiting software trigger a frame answers (None in free run and hardware trigger), and the ones
        before it that the camera did not take (:func:`answered_trigger`). The first ``position`` waiting ones
        are owed frames still in flight: they keep their triggers."""
        with self._awaiting_lock:
            if not self._awaiting:
                return None, []
            first = min(position, len(self._awaiting) - 1)
            candidates = list(self._awaiting)[first:]
            usual = float(np.median(self._delays)) if self._delays else None
            answered = answered_trigger([t.utc for t in candidates], arrival_utc, stamp_s, usual)
            for _ in range(answered + 1):
                del self._awaiting[first]
        if stamp_s is not None:
            self._delays.append(stamp_s - candidates[answered].utc)
        return candidates[answered], candidates[:answered]

    def _pop_awaiting(self, older_than: float = math.inf) -> _Trigger | None:
        """The oldest waiting software trigger if it was requested before ``older_than`` (monotonic), else None."""
        with self._awaiting_lock:
            if self._awaiting and self._awaiting[0].mono < older_than:
                return self._awaiting.popleft()
            return None

    def _missing_records(self, ids, give_up_all: bool = False) -> Iterator[PartRecord]:
        """A NO_VERDICT part per frame id given up as missing (an alarm instead beyond ``max_gap_rows``)."""
        missing = self._tracker.overdue(math.inf if give_up_all else time.monotonic())
        self.stats["missing"] += len(missing)
        if len(missing) > self.config.max_gap_rows:
            self.on_alarm(f"camera {self.device_id}: {len(missing)} frames missing, ids {missing[0]}..{missing[-1]} "
                          f"(more than max_gap_rows={self.config.max_gap_rows}; no part rows for them)")
            return
        for lost in missing:
            request = self._pop_awaiting()
            yield self._no_frame(ids, request, f"frame id {lost} of camera {self.device_id} never arrived "
                                 "(lost in transport, or the buffer pool ran dry)", frame_ref(self.device_id, lost, -1))

    def _frame_records(self, buffer: Any, ids) -> list[PartRecord]:
        """The part of one popped buffer, after a NO_VERDICT part for each software trigger it shows the camera
        did not take (see :meth:`_take_trigger`)."""
        Arv, _ = aravis()
        frame_id, stamp = buffer.get_frame_id(), buffer.get_timestamp()
        status = buffer.get_status()
        complete = status == Arv.BufferStatus.SUCCESS
        if alarm := self._tracker.observe(frame_id, time.monotonic(), complete):
            self.on_alarm(f"camera {self.device_id}: {alarm}")
        recorded_as = self._tracker.recorded_as      # an incomplete frame's stale id belongs to another frame
        arrival = buffer.get_system_timestamp() / 1e9 or time.time()
        request, not_taken = self._take_trigger(self._tracker.position, arrival,
                                                stamp / 1e9 if complete and stamp > 0 else None)
        self.stats["missed_triggers"] += len(not_taken)
        records = [self._no_frame(ids, skipped, f"software trigger not taken by camera {self.device_id}: the "
                                  "next frame answers a later trigger (triggers closer together than the camera "
                                  "can take them?)") for skipped in not_taken]
        if request is not None:
            mono, utc = request.mono, request.utc
        else:
            utc = arrival
            mono = time.monotonic() - max(0.0, time.time() - utc)
        record = PartRecord(part_id=(request.part_id if request and request.part_id else ids.next()),
                            recipe=self.config.recipe, capture_time=utc, capture_monotonic=mono,
                            encoder=request.encoder if request else None,
                            source_ref=frame_ref(self.device_id, recorded_as or UNKNOWN_FRAME_ID, stamp))
        records.append(record)
        self.stats["frames"] += 1
        if complete:
            self._decode_frame(record, buffer, frame_id)
            return records
        self.stats["incomplete"] += 1
        which = f"frame id {frame_id}"
        if recorded_as != frame_id:
            which = (f"frame id {recorded_as}" if recorded_as else "frame of unknown id") + \
                f" (its buffer carried the stale id {frame_id})"
        record.raw = UndecodableFrame(b"", f"incomplete {which} from camera {self.device_id}: "
                                      f"buffer status {status.value_nick} (GigE packet loss: check MTU, "
                                      "packet_size, socket buffers; deploy/README.md)")
        return records

    def _decode_frame(self, record: PartRecord, buffer: Any, frame_id: int) -> None:
        """A complete frame's pixels (and 3D component, and chunk encoder count) into ``record``; a pixel format
        it cannot convert makes the part undecodable."""
        Arv, _ = aravis()
        if self._chunks is not None:
            record.encoder = self._chunk_encoder(buffer)
        where = f"frame id {frame_id} from camera {self.device_id}"
        try:
            if buffer.get_payload_type() == Arv.BufferPayloadType.MULTIPART:
                record.image, record.cloud, problem = pair_components(buffer_components(buffer),
                                                                       self._invalid_3d)
                if problem and self.config.multipart:
                    record.decide(Verdict.NO_VERDICT, Reason.SCANNER_ERROR, f"{where}: {problem}")
            else:
                record.image = to_rgb(buffer.get_image_data(), buffer.get_image_pixel_format(),
                                      buffer.get_image_width(), buffer.get_image_height())
        except PixelFormatError as exc:
            record.raw = UndecodableFrame(b"", f"{where}: {exc}")

    def _chunk_encoder(self, buffer: Any) -> int | None:
        _, GLib = aravis()
        try:
            return int(self._chunks.get_integer_value(buffer, f"Chunk{self.config.encoder_chunk}"))
        except GLib.Error as exc:
            log.warning("camera %s: chunk %s unreadable: %s", self.device_id, self.config.encoder_chunk, exc.message)
            return None

    def _no_frame(self, ids, request: _Trigger | None, reason: str, ref: str | None = None) -> PartRecord:
        """A part that was due but has no frame: decided NO_VERDICT (decode_error) with ``reason``."""
        now_mono, now_utc = time.monotonic(), time.time()
        record = PartRecord(part_id=(request.part_id if request and request.part_id else ids.next()),
                            recipe=self.config.recipe, capture_time=request.utc if request else now_utc,
                            capture_monotonic=request.mono if request else now_mono,
                            encoder=request.encoder if request else None,
                            source_ref=ref or f"genicam://{quote(self.device_id, safe='')}/")
        record.raw = UndecodableFrame(b"", reason)
        return record

    # -- losing and finding the camera -----------------------------------------------------------------------
    def _answers(self) -> bool:
        """Whether the camera still replies to a register read (GigE) or a feature read (USB3)."""
        _, GLib = aravis()
        with self._camera_lock:
            try:
                if self._camera.is_gv_device():
                    self._camera.get_device().read_register(_PROBE_REGISTER)
                else:
                    self._camera.get_device().get_string_feature_value("DeviceVendorName")
                return True
            except GLib.Error:
                return False

    def _lose(self, why: str, ids) -> Iterator[PartRecord]:
        self.stats["reconnects"] += 1
        self.on_alarm(f"camera {self.device_id} lost ({why}); reconnecting every "
                      f"{self.config.reconnect_interval_s:g} s")
        self._close_camera()
        yield from self._missing_records(ids, give_up_all=True)
        while request := self._pop_awaiting():
            yield self._no_frame(ids, request, f"camera {self.device_id} was lost before the "
                                 "triggered frame arrived")

    def _try_reopen(self, lost_at: float) -> bool:
        try:
            self._open_camera()
        except SourceError as exc:
            log.debug("reconnect %s: %s", self.config.camera, exc)
            return False
        self.on_alarm(f"camera {self.device_id} reconnected after {time.monotonic() - lost_at:.1f} s")
        return True


_FORMAT_CODES = {f.code for f in FORMATS.values()}


@dataclass(frozen=True)
class Component:
    """One part of a GigE Vision multi-part buffer, as Aravis hands it over."""

    kind: str               # "2d" (an image), "3d" (a 3D image), or Aravis' name of another part type
    pixel_format: int       # PFNC code
    width: int
    height: int
    data: bytes


def buffer_components(buffer: Any) -> list[Component]:
    """The parts of an Aravis multi-part buffer, in order."""
    components = []
    for i in range(buffer.get_n_parts()):
        nick = buffer.get_part_data_type(i).value_nick      # planes of planar formats are refused later
        kind = {"2d-image": "2d", "3d-image": "3d"}.get(nick, nick)
        components.append(Component(kind, buffer.get_part_pixel_format(i), buffer.get_part_width(i),
                                    buffer.get_part_height(i), bytes(buffer.get_part_data(i))))
    return components


def pair_components(components: list[Component], invalid: float | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """``(image, cloud, problem)`` of one multi-part buffer: the first 2D component in a supported pixel format
    as RGB, and the first 3D component in ``Coord3D_ABC32f`` as an organised cloud on the same pixel grid.

    Both come from one buffer, so they share the frame id and the instant. ``problem`` says why ``cloud`` is
    None (no 3D component, another format, another grid). ``PixelFormatError`` when there is no usable image.
    """
    images = [c for c in components if c.kind == "2d" and c.pixel_format in _FORMAT_CODES]
    if not images:
        shown = ", ".join(f"{c.kind} 0x{c.pixel_format:08X}" for c in components) or "no parts"
        raise PixelFormatError(f"multi-part buffer has no 2D component in a supported pixel format ({shown})")
    first = images[0]
    image = to_rgb(first.data, first.pixel_format, first.width, first.height)
    clouds = [c for c in components if c.kind == "3d" or is_coord3d(c.pixel_format)]
    if not clouds:
        return image, None, "multi-part buffer has no 3D component"
    cloud_part = next((c for c in clouds if is_coord3d(c.pixel_format)), None)
    if cloud_part is None:
        return image, None, (f"3D component in pixel format 0x{clouds[0].pixel_format:08X}, not Coord3D_ABC32f: "
                             "set the camera's 3D output to Coord3D_ABC32f in Cartesian coordinates")
    if (cloud_part.width, cloud_part.height) != (first.width, first.height):
        return image, None, (f"3D component of {cloud_part.width} x {cloud_part.height} points is not on the "
                             f"image's {first.width} x {first.height} grid")
    try:
        return image, to_cloud(cloud_part.data, cloud_part.pixel_format, cloud_part.width, cloud_part.height,
                               invalid), None
    except PixelFormatError as exc:
        return image, None, str(exc)


def scan3d_invalid_value(camera: Any) -> float | None:
    """The camera's ``Scan3dInvalidDataValue`` when its ``Scan3dInvalidDataFlag`` is set, else None; a camera
    whose 3D coordinates are not Cartesian is refused (``SourceError`` naming ``multipart``)."""
    _, GLib = aravis()
    try:
        system = camera.get_string("Scan3dCoordinateSystem")
    except GLib.Error:
        system = "Cartesian"           # no Scan3d features: trust the pixel format
    if system != "Cartesian":
        raise SourceError(f"source config key 'multipart': camera's Scan3dCoordinateSystem is {system!r}; set it "
                          "to Cartesian (points are read as x, y, z)")
    try:
        return camera.get_float("Scan3dInvalidDataValue") if camera.get_boolean("Scan3dInvalidDataFlag") else None
    except GLib.Error:
        return None


def _choose_receive_path(camera: Any, c: GenICamConfig, Arv: Any) -> None:
    """Aravis receives GigE Vision streams through an AF_PACKET socket where the process may open one (root,
    CAP_NET_RAW), else through a UDP socket. The packet socket is off with ``packet_socket: false`` and for a
    camera on a loopback address, where it misses whole streams now and then (seen with the simulator)."""
    loopback = camera.get_device().get_device_address().get_address().get_is_loopback()
    camera.gv_set_stream_options(Arv.GvStreamOption.NONE if c.packet_socket and not loopback
                                 else Arv.GvStreamOption.PACKET_SOCKET_DISABLED)


def _set_stream_options(stream: Any, c: GenICamConfig, Arv: Any) -> None:
    stream.set_property("packet-resend", Arv.GvStreamPacketResend.ALWAYS if c.packet_resend
                        else Arv.GvStreamPacketResend.NEVER)
    if c.socket_buffer_bytes is not None:
        stream.set_property("socket-buffer", Arv.GvStreamSocketBuffer.FIXED)
        stream.set_property("socket-buffer-size", c.socket_buffer_bytes)


def configure_camera(camera: Any, c: GenICamConfig) -> None:
    """Write the config's features to an open Aravis camera; ``SourceError`` names the config key that failed.

    Order matters: the frame rate first (Aravis clears FrameStart triggering there on some cameras), then
    the trigger, then ``features`` (which may override anything before them).
    """
    Arv, GLib = aravis()
    steps: list[tuple[str, Callable[[], Any]]] = []
    if c.pixel_format is not None:
        steps.append(("pixel_format", lambda: camera.set_pixel_format_from_string(c.pixel_format)))
    if c.roi is not None:
        steps.append(("roi", lambda: camera.set_region(*c.roi)))
    if c.exposure_us is not None:
        steps.append(("exposure_us", lambda: camera.set_exposure_time(c.exposure_us)))
    if c.gain is not None:
        steps.append(("gain", lambda: camera.set_gain(c.gain)))
    if c.frame_rate is not None:
        steps.append(("frame_rate", lambda: camera.set_frame_rate(c.frame_rate)))
    if c.trigger == "free_run":
        steps.append(("trigger", camera.clear_triggers))
    else:
        source = "Software" if c.trigger == "software" else c.trigger_source
        steps.append(("trigger_source" if c.trigger == "hardware" else "trigger", lambda: camera.set_trigger(source)))
        if c.trigger == "hardware" and c.trigger_activation != "RisingEdge":
            steps.append(("trigger_activation", lambda: camera.set_string("TriggerActivation", c.trigger_activation)))
    if c.encoder_chunk:
        steps.append(("encoder_chunk", lambda: camera.set_chunks(c.encoder_chunk)))
    for name, value in c.features.items():
        steps.append((f"features.{name}", lambda name=name, value=value: _set_feature(camera, name, value)))
    if c.multipart:
        steps.append(("multipart", lambda: _enable_multipart(camera)))
    if camera.is_gv_device():
        if c.packet_size is not None:
            steps.append(("packet_size", lambda: camera.gv_set_packet_size(c.packet_size)))
        if c.packet_delay_ns is not None:
            steps.append(("packet_delay_ns", lambda: camera.gv_set_packet_delay(c.packet_delay_ns)))
    for key, step in steps:
        try:
            step()
        except GLib.Error as exc:
            raise SourceError(f"source config key {key!r}: camera {c.camera!r} refused it: {exc.message}") from None
    if c.pixel_format is not None and camera.get_pixel_format_as_string() != c.pixel_format:
        raise SourceError(f"source config key 'pixel_format': camera {c.camera!r} kept "
                          f"{camera.get_pixel_format_as_string()!r} instead of {c.pixel_format!r}")


def _enable_multipart(camera: Any) -> None:
    """GigE Vision multi-part transfer, refused (as a GLib error) by a camera that cannot send it."""
    Arv, GLib = aravis()
    if not camera.is_gv_device() or not camera.gv_is_multipart_supported():
        raise GLib.Error("the camera does not send GigE Vision multi-part buffers")
    camera.gv_set_multipart(True)


def _set_feature(camera: Any, name: str, value: bool | int | float | str) -> None:
    if isinstance(value, bool):
        camera.set_boolean(name, value)
    elif isinstance(value, int):
        camera.set_integer(name, value)
    elif isinstance(value, float):
        camera.set_float(name, value)
    else:
        camera.set_string(name, value)


# -- discovery, for `musc-edge doctor` ---------------------------------------------------------------------
def list_cameras() -> list[dict[str, str]]:
    """The cameras Aravis discovers now (GigE Vision broadcast on every interface, USB3 Vision on the bus)."""
    Arv, _ = aravis()
    Arv.update_device_list()
    return [{"id": Arv.get_device_id(i) or "", "vendor": Arv.get_device_vendor(i) or "",
             "model": Arv.get_device_model(i) or "", "serial": Arv.get_device_serial_nbr(i) or "",
             "address": Arv.get_device_address(i) or "", "protocol": Arv.get_device_protocol(i) or ""}
            for i in range(Arv.get_n_devices())]


def open_camera(name: str) -> Any:
    """The Aravis camera ``name`` names: a device id or address as Aravis matches them, or a serial number
    of a discovered camera. ``SourceError`` listing the cameras seen when none answers to it."""
    Arv, GLib = aravis()
    try:
        return Arv.Camera.new(name)
    except GLib.Error as exc:
        first = exc.message
    cameras = list_cameras()
    for found in cameras:
        if name in (found["serial"], found["address"]) and found["id"]:
            try:
                return Arv.Camera.new(found["id"])
            except GLib.Error as exc:
                first = exc.message
    seen = ", ".join(f"{d['id']} (serial {d['serial']}, {d['address']})" for d in cameras) or "none"
    raise SourceError(f"cannot open GenICam camera {name!r}: {first} (cameras seen: {seen})")


def describe_camera(camera_id: str) -> dict[str, Any]:
    """Key features of one camera, read (not written) while it is opened: pixel formats, sensor and ROI,
    exposure, gain, frame rate, trigger sources, and for GigE the packet size and delay."""
    _, GLib = aravis()
    camera = open_camera(camera_id)
    info: dict[str, Any] = {"id": camera.get_device_id(), "vendor": camera.get_vendor_name(),
                            "model": camera.get_model_name(), "serial": camera.get_device_serial_number()}
    reads = {"pixel_format": camera.get_pixel_format_as_string,
             "pixel_formats": camera.dup_available_pixel_formats_as_strings,
             "sensor": lambda: "{0.width}x{0.height}".format(camera.get_sensor_size()),
             "roi": lambda: list(camera.get_region()),
             "exposure_us": camera.get_exposure_time, "gain": camera.get_gain,
             "frame_rate": camera.get_frame_rate, "trigger_sources": camera.dup_available_trigger_sources,
             "trigger": lambda: " ".join(camera.get_string(name) for name in ("TriggerMode", "TriggerSource",
                                                                               "TriggerActivation")),
             "chunks": camera.are_chunks_available}
    if camera.is_gv_device():
        reads.update(packet_size=camera.gv_get_packet_size, packet_delay_ns=camera.gv_get_packet_delay)
    for key, read in reads.items():
        try:
            value = read()
            info[key] = list(value) if isinstance(value, (list, tuple)) else value
        except GLib.Error as exc:
            info[key] = f"unreadable ({exc.message})"
    return info


def doctor_report(source: GenICamConfig) -> list[tuple[str, str, str, str]]:
    """``(status, name, detail, hint)`` lines for ``musc-edge doctor``: Aravis, the cameras seen, and the
    configured camera's key features (``fail`` when it cannot be opened)."""
    missing = aravis_missing()
    if missing:
        return [("fail", "genicam", missing, INSTALL_HINT)]
    cameras = list_cameras()
    seen = "\n".join(f"{d['id']} ({d['vendor']} {d['model']}, serial {d['serial']}, {d['protocol']} "
                     f"{d['address']})" for d in cameras) or "none"
    lines = [("ok" if cameras else "warn", "genicam cameras seen", seen,
              "check the cabling, the NIC's address in the camera's subnet, and the firewall (UDP 3956)")]
    wanted = source.camera
    try:
        info = describe_camera(wanted)
    except SourceError as exc:
        return [*lines, ("fail", "genicam camera", f"source.camera: {exc}",
                         "set source.camera to one of the ids, serials or addresses seen")]
    detail = "\n".join(f"{k}: {v}" for k, v in info.items())
    configured = source.pixel_format
    if configured and configured not in info.get("pixel_formats", []):
        return [*lines, ("fail", "genicam camera", detail, f"source.pixel_format {configured!r} is not offered "
                         "by this camera; pick one of its pixel_formats")]
    return [*lines, ("ok", "genicam camera", detail, "")]
