# Copyright 2026 The RAVEN-video authors. Apache-2.0.
"""The browser demo: a Starlette app that streams ``CausalWanPipeline.stream`` to a web page over a WebSocket.

Pieces, top to bottom:
- :class:`StreamLimits`: what lengths a model allows (its chunking and its RoPE table, 1024 latent frames).
- :class:`GenerationJob`: one generation in a worker thread. Between chunks it checks a cancel flag, honours pause,
  and waits while the page is more than ``lead_chunks`` chunks behind (the page acknowledges the frames it has
  shown), so a prompt switch shows up within about one chunk and memory stays bounded on a fast GPU. The mp4 holds
  exactly the frames the page showed: frames are encoded as they are acknowledged (``AtomicVideoWriter``).
- :class:`GenerationGate`: one generation at a time per process (one GPU); other clients wait in a FIFO queue and
  see their position, beyond ``max_waiting`` they are refused.
- :class:`DemoSession`: one WebSocket connection; its messages are listed in ``docs/demo.md``.
- :func:`create_app`: the Starlette app (``pipeline=`` injects a pipeline, e.g. the tiny one in tests).

The event loop never runs model code: the worker thread hands results over with ``loop.call_soon_threadsafe``. The
model code itself (creating, advancing and closing each stream) runs on one long-lived thread, ``Demo.model_thread``,
whichever job asks: PyTorch keeps cuDNN's execution plans per thread, so a new thread per stream re-plans (and, with
``enable_realtime``'s ``cudnn.benchmark``, re-benchmarks) every convolution of its first chunk.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import struct
import tempfile
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable

from ..models.attention_layout import num_frames_problem, validate_window

logger = logging.getLogger("raven_video.demo")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
#: "endless" streams: LongLive-style window + attention sink (latent frames)
ENDLESS_WINDOW = {"local_attn_size": 21, "sink_size": 3}
#: seeds accepted from the page (torch.Generator.manual_seed takes any 64-bit value; the page needs no more)
MAX_SEED = 2**32 - 1


class InputError(ValueError):
    """Bad input from the page; its message is shown there as it is."""


class QueueFull(RuntimeError):
    """Every place in the waiting queue is taken."""


class _Cancelled(Exception):
    """The client went away: abort the generation and its video."""


@dataclass
class DemoSettings:
    """Knobs of the demo server (the command line sets the first four)."""

    guidance_scale: float | None = None  # None: the model's own (pipe.default_guidance_scale), else 1 = unguided
    height: int | None = None  # None: the model's native size
    width: int | None = None
    fps: int | None = None  # None: the pipeline's ``fps`` (16 for the world model)
    default_frames: int = 81
    max_prompt_chars: int = 400
    max_waiting: int = 4  # clients waiting for the GPU; more are refused
    lead_chunks: int = 2  # chunks generated ahead of what the page has shown
    ack_timeout_s: float = 30.0  # after generation: give up waiting for the page to show the rest
    jpeg_quality: int = 90
    switch_lookahead: int = 0  # 1 with an overlapped decode (enable_realtime): the sampler is one chunk ahead
    record_video: bool = True  # False: no mp4 of what was shown (no encoding, no download button)


class StreamLimits:
    """Lengths a pipeline can stream: whole chunks, at most the RoPE table of latent frames."""

    def __init__(self, pipe):
        config = pipe.transformer.config
        self.frames_per_block = int(config.num_frames_per_block)
        self.first_block = config.num_frames_first_block
        self.stride = int(pipe.vae_scale_factor_temporal)
        first = self.frames_per_block if self.first_block is None else int(self.first_block)
        rope = int(config.rope_max_seq_len)
        latent = first + (rope - first) // self.frames_per_block * self.frames_per_block
        self.max_latent_frames = latent
        self.max_frames = self.stride * (latent - 1) + 1  # the longest stream ("endless")
        self.first_chunk_frames = self.stride * (first - 1) + 1
        self.chunk_frames = self.stride * self.frames_per_block
        try:
            validate_window(ENDLESS_WINDOW["local_attn_size"], ENDLESS_WINDOW["sink_size"], self.frames_per_block)
            self.endless_window = dict(ENDLESS_WINDOW)
        except ValueError:  # chunks too long for the window: keep the model's own window
            self.endless_window = {}

    def num_chunks(self, num_frames: int) -> int:
        latent = (num_frames - 1) // self.stride + 1
        first = self.frames_per_block if self.first_block is None else int(self.first_block)
        return 1 + (latent - first) // self.frames_per_block

    def parse_length(self, value: Any) -> tuple[int, bool]:
        """``(num_frames, endless)`` from the page's length field: a frame count or ``"endless"``."""
        if isinstance(value, str) and value.strip().lower() == "endless":
            return self.max_frames, True
        if isinstance(value, str) and value.strip().lstrip("+").isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"length {value!r} must be a number of frames (e.g. 81) or \"endless\".")
        if not 1 <= value <= self.max_frames:
            raise InputError(f"length {value} frames is out of range: 1..{self.max_frames} frames (the RoPE table "
                             f"holds {self.max_latent_frames} latent frames); choose \"endless\" for the longest stream.")
        problem = num_frames_problem(value, self.frames_per_block, self.first_block, self.stride)
        if problem:
            raise InputError(f"length {value} frames {problem} (whole chunks of {self.chunk_frames} frames).")
        return value, False


def parse_seed(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise InputError(f"seed {value!r} must be a whole number in 0..{MAX_SEED}.")
    return value


def jpeg_bytes(frame, quality: int) -> bytes:
    """One uint8 ``[H, W, 3]`` frame as JPEG (what the page draws)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality, subsampling=0)  # 4:4:4: crisp colour edges
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- the worker thread
class GenerationJob:
    """One generation in its own thread; the control methods are called from the event loop and never block.

    ``emit(item)`` hands a JSON message (dict) or a binary frame (bytes: 4-byte big-endian frame index + JPEG) to the
    event loop; ``on_generated()`` is called once the model is no longer needed (the gate is released there).
    """

    def __init__(self, demo: "Demo", prompt: str, seed: int, num_frames: int, endless: bool, video_path: str,
                 emit: Callable[[Any], None], on_generated: Callable[[], None]):
        self.demo, self.prompt, self.seed, self.num_frames, self.endless = demo, prompt, seed, num_frames, endless
        self.video_path, self.emit, self.on_generated = video_path, emit, on_generated
        self.num_chunks = demo.limits.num_chunks(num_frames)
        self.lead_frames = demo.settings.lead_chunks * demo.limits.chunk_frames
        self.cond = threading.Condition()
        self.cancelled = False
        self.paused = False
        self.stop_requested = False
        self.shown = 0  # frames the page has drawn (acknowledged)
        self.sent = 0  # frames handed to the page
        self.written = 0  # frames encoded into the mp4
        self.pending: deque = deque()  # uint8 frames sent but not written yet: indices written..sent-1
        self.schedule: dict[int, str] = {}  # {chunk: prompt}, read lazily by CausalWanPipeline.stream
        self.received = -1  # last chunk index out of the pipeline
        self.computing: int | None = None  # chunk index the pipeline is working on
        self.thread = threading.Thread(target=self._run, name="raven-demo-generation", daemon=True)

    # ---------------------------------------------------------------- control (event loop side)
    def start(self) -> None:
        self.thread.start()

    def cancel(self) -> None:
        with self.cond:
            self.cancelled = True
            self.cond.notify_all()

    def pause(self, paused: bool) -> None:
        with self.cond:
            self.paused = paused
            self.cond.notify_all()

    def ack(self, shown: int) -> None:
        with self.cond:
            if not self.stop_requested:
                self.shown = max(self.shown, min(int(shown), self.sent))
            self.cond.notify_all()

    def stop(self, shown: int | None) -> None:
        """Stop generating; the video ends at the last frame the page showed."""
        with self.cond:
            if shown is not None:
                self.shown = max(self.written, min(int(shown), self.sent))
            self.stop_requested = True
            self.cond.notify_all()

    def switch_prompt(self, prompt: str) -> int | None:
        """Schedule ``prompt`` from the next chunk the pipeline has not started; ``None`` if none is left."""
        with self.cond:
            nxt = (self.received + 1 if self.computing is None else self.computing + 1) + self.demo.settings.switch_lookahead
            nxt = max(nxt, 1)
            if nxt >= self.num_chunks:
                return None
            for later in [k for k in self.schedule if k > nxt]:  # the newest prompt wins from here on
                del self.schedule[later]
            self.schedule[nxt] = prompt
            return nxt

    # ---------------------------------------------------------------- the thread
    def _take_shown(self) -> list:
        """Frames the page has shown and the mp4 lacks (call under ``cond``)."""
        count = max(0, min(self.shown, self.sent) - self.written)
        self.written += count
        return [self.pending.popleft() for _ in range(count)]

    def _wait(self, writer, ready: Callable[[], bool], timeout_s: float | None = None) -> None:
        """Encode shown frames until ``ready()`` (checked under ``cond``); raises :class:`_Cancelled`."""
        last_progress = time.monotonic()
        while True:
            with self.cond:
                if self.cancelled:
                    raise _Cancelled
                frames = self._take_shown()
                done = ready()
                if not frames and not done:
                    self.cond.wait(0.25)
            if frames:
                writer.append(frames)
                last_progress = time.monotonic()
            if done:
                return
            if timeout_s is not None and not self.paused and time.monotonic() - last_progress > timeout_s:
                logger.warning("the page stopped acknowledging frames; the video ends at the last one it showed")
                return

    def _run(self) -> None:
        import numpy as np
        import torch

        from ..utils.video_io import AtomicVideoWriter, to_uint8_frames

        demo, stream = self.demo, None
        quality = demo.settings.jpeg_quality
        window = demo.limits.endless_window if self.endless else {}
        try:
            recorder = (AtomicVideoWriter(self.video_path, fps=demo.fps) if demo.settings.record_video
                        else _NoRecording())
            with recorder as writer:
                stream = demo.pipe.stream(  # a generator: its code runs in `next`, on the model thread
                    self.prompt, num_frames=self.num_frames, height=demo.height, width=demo.width,
                    guidance_scale=demo.guidance_scale,
                    generator=torch.Generator(device="cpu").manual_seed(self.seed), output_type="np",
                    prompt_schedule=self.schedule, **window)
                tic = time.perf_counter()
                while True:
                    # pause, and stay at most `lead_frames` ahead of the page
                    self._wait(writer, lambda: self.stop_requested or (
                        not self.paused and self.sent - self.shown <= self.lead_frames))
                    if self.stop_requested:
                        break
                    with self.cond:
                        self.computing = self.received + 1
                    compute = time.perf_counter()
                    chunk = demo.on_model_thread(next, stream, None)
                    compute = time.perf_counter() - compute  # model + decode only, not the waits above
                    with self.cond:
                        self.computing = None
                    if chunk is None:
                        break
                    frames = to_uint8_frames(chunk.frames[0], layout="FHWC")
                    jpegs = [jpeg_bytes(frame, quality) for frame in frames]
                    with self.cond:
                        self.received, start = chunk.index, self.sent
                        self.pending.extend(np.array(frame) for frame in frames)
                        self.sent += len(frames)
                    demo.count("chunks")
                    self.emit({"type": "chunk", "index": chunk.index, "num_chunks": self.num_chunks,
                               "frame_start": start, "num_frames": len(frames), "seconds": round(compute, 4),
                               "since_start": round(time.perf_counter() - tic, 4),
                               "prompt": (chunk.prompt or [self.prompt])[0]})
                    for i, jpeg in enumerate(jpegs):
                        self.emit(struct.pack(">I", start + i) + jpeg)
                    if self.cancelled:
                        raise _Cancelled
                demo.on_model_thread(stream.close)  # frees the KV cache now, before the page has played the rest
                stream = None
                self.on_generated()
                self.emit({"type": "generated", "frames": self.sent, "stopped": self.stop_requested})
                # the page plays out what it has; the mp4 ends where the page stops
                self._wait(writer, lambda: self.stop_requested or self.shown >= self.sent,
                           timeout_s=demo.settings.ack_timeout_s)
                with self.cond:
                    frames = self._take_shown()
                if frames:
                    writer.append(frames)
                if self.written == 0:
                    writer.abort()  # nothing was shown: no video
            recorded = self.written and demo.settings.record_video
            self.emit({"type": "video", "frames": self.written, "fps": demo.fps,
                       "url": f"/video/{os.path.basename(self.video_path)}" if recorded else None})
        except _Cancelled:
            demo.count("cancelled")
        except Exception as err:  # noqa: BLE001 - reported to the page in one line; the traceback goes to the log
            logger.exception("generation failed")
            demo.count("failed")
            self.emit({"type": "error", "fatal": True,
                       "message": f"generation failed: {type(err).__name__}: {err}"})
        finally:
            if stream is not None:
                demo.on_model_thread(stream.close)
            self.pending.clear()
            self.on_generated()
            self.emit({"type": "_finished"})


class _NoRecording:
    """The video writer's interface when ``DemoSettings.record_video`` is off: shown frames are dropped."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def append(self, frames) -> None:
        pass

    def abort(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------- the queue
class GenerationGate:
    """One generation at a time; a FIFO of at most ``max_waiting`` waiting jobs (lives on the event loop)."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self.owner: GenerationJob | None = None
        self.waiting: list[tuple[GenerationJob, asyncio.Future, Callable[[int], None]]] = []

    async def acquire(self, job: GenerationJob, on_position: Callable[[int], None]) -> None:
        if self.owner is None and not self.waiting:
            self.owner = job
            return
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"the demo is busy: one stream is running and {len(self.waiting)} client(s) are waiting "
                            f"(at most {self.max_waiting}); try again in a minute.")
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((job, future, on_position))
        self._notify()
        try:
            await future
        except asyncio.CancelledError:
            if self.owner is job:  # granted while being cancelled
                self.release(job)
            self.waiting = [entry for entry in self.waiting if entry[0] is not job]
            self._notify()
            raise

    def release(self, job: GenerationJob) -> None:
        if self.owner is not job:
            return
        self.owner = None
        while self.waiting and self.owner is None:
            nxt, future, _ = self.waiting.pop(0)
            if not future.done():
                self.owner = nxt
                future.set_result(None)
        self._notify()

    def _notify(self) -> None:
        for position, (_, _, on_position) in enumerate(self.waiting, start=1):
            on_position(position)


# ----------------------------------------------------------------------------------------------------- the demo
class Demo:
    """What all sessions share: the pipeline, the gate, the videos folder and counters."""

    def __init__(self, pipe, settings: DemoSettings, model: str | None = None, model_name: str | None = None):
        self.pipe, self.settings, self.model = pipe, settings, model
        self.model_name = model_name or model or "injected pipeline"
        self.limits = StreamLimits(pipe)
        config = pipe.config
        self.fps = int(settings.fps or config.get("fps") or 16)
        if settings.guidance_scale is not None:
            self.guidance_scale = float(settings.guidance_scale)
        else:  # the model's own guidance (model_index.json `guidance_scale`), as generate.py
            self.guidance_scale = float(getattr(pipe, "default_guidance_scale", None) or config.get("guidance_scale")
                                        or 1.0)
        self.height = int(settings.height or config.get("height") or 480)
        self.width = int(settings.width or config.get("width") or 832)
        self.gate = GenerationGate(settings.max_waiting)
        self._videos = tempfile.TemporaryDirectory(prefix="raven-demo-")
        self.videos_dir = self._videos.name
        self._counts_lock = threading.Lock()
        self.counts = {"generations": 0, "chunks": 0, "cancelled": 0, "failed": 0, "sessions": 0}
        self.running: set[GenerationJob] = set()  # jobs whose thread is alive
        # every stream's model code, whichever job runs it: cuDNN's per-thread plan caches then last across streams
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raven-demo-model")
        self.world_vocabulary = self._world_vocabulary()
        pipe.set_progress_bar_config(disable=True)  # per-chunk numbers go to the page; tqdm would add a thread

    def on_model_thread(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` on :attr:`model_thread`; the calling job's thread waits for it."""
        try:
            future = self.model_thread.submit(fn, *args, **kwargs)
        except RuntimeError:  # shut down (the server is stopping): a job closing its stream does it here
            return fn(*args, **kwargs)
        return future.result()

    def count(self, key: str, n: int = 1) -> None:
        with self._counts_lock:
            self.counts[key] += n

    def _world_vocabulary(self) -> list[str] | None:
        if self.model is None or not os.path.isfile(os.path.join(self.model, "tokenizer", "tokenizer.json")):
            return None
        from ..cli.generate import UsageError, check_world_prompts
        from ..world.captions import VOCABULARY

        try:
            check_world_prompts(self.model, ["zzqxj"])  # a world tokenizer names this word as unknown
        except UsageError:
            return list(VOCABULARY)  # it rejected a non-world word: a world tokenizer
        return None

    def check_prompt(self, prompt: Any) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty; describe the video you want.")
        prompt = " ".join(prompt.split())
        if len(prompt) > self.settings.max_prompt_chars:
            raise InputError(f"the prompt has {len(prompt)} characters; at most {self.settings.max_prompt_chars}.")
        if self.world_vocabulary is not None:
            from ..cli.generate import UsageError, check_world_prompts

            try:
                check_world_prompts(self.model, [prompt])
            except UsageError as err:
                raise InputError(str(err).removeprefix("error: ")) from None
        return prompt

    def page_config(self) -> dict:
        limits = self.limits
        return {
            "model": self.model_name, "fps": self.fps, "height": self.height, "width": self.width,
            "guidance_scale": self.guidance_scale,
            "default_frames": self.settings.default_frames, "max_frames": limits.max_frames,
            "chunk_frames": limits.chunk_frames, "first_chunk_frames": limits.first_chunk_frames,
            "endless_frames": limits.max_frames, "endless_seconds": round(limits.max_frames / self.fps, 1),
            "endless_window": limits.endless_window, "max_prompt_chars": self.settings.max_prompt_chars,
            "max_seed": MAX_SEED, "world_vocabulary": self.world_vocabulary,
            "example_prompt": ("a red circle moves right quickly and bounces off the wall, on a black background"
                               if self.world_vocabulary else "a cat walks on the grass"),
        }

    def status(self) -> dict:
        with self._counts_lock:
            counts = dict(self.counts)
        return {"running": self.gate.owner is not None, "waiting": len(self.gate.waiting),
                "worker_threads": sum(job.thread.is_alive() for job in list(self.running)), **counts}

    def video_path(self, name: str) -> str | None:
        if not name.endswith(".mp4") or not all(c in "0123456789abcdef" for c in name[:-4]) or len(name) != 36:
            return None
        path = os.path.join(self.videos_dir, name)
        return path if os.path.isfile(path) else None

    def close(self) -> None:
        self.model_thread.shutdown(wait=False, cancel_futures=True)
        self._videos.cleanup()


# ----------------------------------------------------------------------------------------------------- a client
class DemoSession:
    """One WebSocket client: reads its messages, runs at most one job, sends frames and status."""

    def __init__(self, demo: Demo, websocket):
        self.demo, self.websocket = demo, websocket
        self.loop = asyncio.get_running_loop()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.job: GenerationJob | None = None
        self.job_task: asyncio.Task | None = None
        self.video: str | None = None

    def send(self, item: Any) -> None:
        self.outbox.put_nowait(item)

    def send_threadsafe(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass

    def _release_threadsafe(self, job: GenerationJob) -> None:
        try:
            self.loop.call_soon_threadsafe(self.demo.gate.release, job)
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass

    def error(self, message: str) -> None:
        self.send({"type": "error", "message": message})

    async def run(self) -> None:
        await self.websocket.accept()
        self.demo.count("sessions")
        sender = asyncio.create_task(self._sender())
        self.send({"type": "hello", **self.demo.page_config()})
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    self.error("send JSON text messages.")
                    continue
                try:
                    data = json.loads(text)
                    if not isinstance(data, dict):
                        raise ValueError
                except ValueError:
                    self.error("a message must be a JSON object such as {\"type\": \"start\", ...}.")
                    continue
                try:
                    self._handle(data)
                except InputError as err:
                    self.error(str(err))
                except Exception:  # noqa: BLE001 - never a traceback in the page
                    logger.exception("demo message %r failed", data.get("type"))
                    self.error("internal error handling this message (see the server log).")
        finally:
            sender.cancel()
            # shielded: a server that cancels this handler on disconnect still waits for the worker thread
            await asyncio.shield(self._cleanup())

    async def _cleanup(self) -> None:
        await self._end_job()
        self._drop_video()

    async def _sender(self) -> None:
        while True:
            item = await self.outbox.get()
            if item is None:
                return
            if isinstance(item, dict) and item.get("type") == "_finished":
                self._job_finished()
                continue
            try:
                if isinstance(item, bytes):
                    await self.websocket.send_bytes(item)
                else:
                    await self.websocket.send_text(json.dumps(item))
            except Exception:  # noqa: BLE001 - the client left; run() cleans up
                return

    # ---------------------------------------------------------------- messages
    def _handle(self, data: dict) -> None:
        kind = data.get("type")
        job = self.job
        if kind == "start":
            if job is not None:
                raise InputError("a stream is already running in this page; stop it first.")
            prompt = self.demo.check_prompt(data.get("prompt"))
            seed = parse_seed(data.get("seed", 0))
            num_frames, endless = self.demo.limits.parse_length(data.get("length", self.demo.settings.default_frames))
            self._drop_video()
            self.video = os.path.join(self.demo.videos_dir, f"{uuid.uuid4().hex}.mp4")
            job = GenerationJob(self.demo, prompt, seed, num_frames, endless, self.video, self.send_threadsafe,
                                on_generated=lambda: None)
            job.on_generated = lambda: self._release_threadsafe(job)
            self.job = job
            self.job_task = asyncio.create_task(self._start_job(job))
        elif kind == "prompt":
            if job is None:
                raise InputError("no stream is running; press start.")
            prompt = self.demo.check_prompt(data.get("prompt"))
            if job.thread.ident is None:  # still queued: it starts with this prompt
                job.prompt = prompt
                self.send({"type": "prompt", "prompt": prompt, "chunk": 0})
                return
            chunk = job.switch_prompt(prompt)
            if chunk is None:
                raise InputError("the stream is at its last chunk; the prompt cannot change any more.")
            self.send({"type": "prompt", "prompt": prompt, "chunk": chunk})
        elif kind in ("pause", "resume"):
            if job is not None:
                job.pause(kind == "pause")
            self.send({"type": kind + "d"})
        elif kind == "stop":
            if job is None:
                return
            shown = data.get("shown")
            shown = shown if isinstance(shown, int) and not isinstance(shown, bool) and shown >= 0 else None
            job.stop(shown)
            if job.thread.ident is None:  # still queued: leave the queue
                self.job_task.cancel()
                self._job_finished()
                self.send({"type": "video", "frames": 0, "url": None})
        elif kind == "shown":
            frames = data.get("frames")
            if job is not None and isinstance(frames, int) and not isinstance(frames, bool):
                job.ack(frames)
        else:
            raise InputError(f"unknown message type {kind!r}; use start, prompt, pause, resume, stop or shown.")

    async def _start_job(self, job: GenerationJob) -> None:
        try:
            await self.demo.gate.acquire(job, lambda n: self.send({"type": "queued", "position": n}))
        except QueueFull as err:
            self.error(str(err))
            self._job_finished()
            return
        if job.cancelled or job.stop_requested:
            self.demo.gate.release(job)
            return
        self.demo.count("generations")
        self.demo.running.add(job)
        self.send({"type": "started", "prompt": job.prompt, "seed": job.seed, "num_frames": job.num_frames,
                   "num_chunks": job.num_chunks, "endless": job.endless, "fps": self.demo.fps,
                   "height": self.demo.height, "width": self.demo.width})
        job.start()

    def _job_finished(self) -> None:
        job, self.job = self.job, None
        if job is not None:
            self.demo.gate.release(job)
            self.demo.running.discard(job)

    async def _end_job(self) -> None:
        """The client left: cancel its job, wait for the thread, free the gate (no orphan thread)."""
        job, task = self.job, self.job_task
        if job is None:
            return
        job.cancel()
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        while job.thread.is_alive():
            await asyncio.sleep(0.02)  # at most one chunk of model work
        if job.thread.ident is not None:
            job.thread.join()
        self.demo.gate.release(job)
        self.demo.running.discard(job)
        self.job = None

    def _drop_video(self) -> None:
        if self.video is not None and os.path.exists(self.video):
            os.unlink(self.video)
        self.video = None


# ----------------------------------------------------------------------------------------------------- the app
def create_app(pipeline=None, model: str | None = None, settings: DemoSettings | None = None,
               model_name: str | None = None):
    """The Starlette app. ``pipeline``: a loaded ``CausalWanPipeline`` (tests inject the tiny one); ``model``: its
    folder, read for the world-vocabulary check. Without ``pipeline`` the model is loaded from ``model`` (see
    :func:`raven_video.demo.load_demo_pipeline`)."""
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route, WebSocketRoute
    from starlette.staticfiles import StaticFiles

    settings = settings or DemoSettings()
    if pipeline is None:
        from . import load_demo_pipeline

        pipeline, model = load_demo_pipeline(model)
    demo = Demo(pipeline, settings, model=model, model_name=model_name)

    async def index(request):
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers={"Cache-Control": "no-store"})

    async def config(request):
        return JSONResponse(demo.page_config())

    async def status(request):
        return JSONResponse(demo.status())

    async def video(request):
        path = demo.video_path(request.path_params["name"])
        if path is None:
            return Response("no such video (it is deleted when its page closes)", status_code=404)
        return FileResponse(path, media_type="video/mp4", filename="raven_demo.mp4")

    async def websocket(ws):
        await DemoSession(demo, ws).run()

    @asynccontextmanager
    async def lifespan(app):
        yield
        demo.close()

    app = Starlette(routes=[
        Route("/", index), Route("/api/config", config), Route("/api/status", status),
        Route("/video/{name}", video), WebSocketRoute("/ws", websocket),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ], lifespan=lifespan)
    app.state.demo = demo
    return app
