"""The browser demo (``raven_video.demo``, docs/demo.md) end to end, driven headless the way the page drives it.

The pipeline is loaded as ``raven-demo`` loads it (``load_demo_pipeline``; ``--realtime``: ``pipe.enable_realtime()``
and ``DemoSettings(switch_lookahead=1)``), the app is served for real by uvicorn on 127.0.0.1 (a free port, in a
thread of this process), and a WebSocket client speaks the page's protocol (docs/demo.md, "How it works"): it sends
``start``, receives the binary frames and acknowledges them with ``shown``, either as soon as they arrive
(``--pace none``: generation throughput) or at the video's frame rate with the page's clock (``--pace video``: a late
frame restarts the clock rather than causing a burst; measures the steady display rate).

Measured, one stream after the other (seeds 0, 1, ...; with ``--realtime`` stream 0 includes torch.compile and
stream 1 CUDA-graph capture, hence one line per stream): first-frame latency (``start`` sent to the first frame
received), each chunk's model + decode seconds (the server's ``chunk.seconds``), time to ``generated``, frames,
generation FPS, display FPS (``--pace video``), and the size of the mp4 downloaded over HTTP from the ``video`` URL.
The last stream switches the prompt once after its first chunk and checks that the chunks from the one the server
named carry the new prompt (skipped when the stream has fewer than 3 chunks; with 3, or 4 with ``--realtime``, a fast
device may have started the last chunk already and the server refuses the switch: use more frames, e.g. the default
81 = 7 chunks). Then a disconnect test: an endless
stream, 3 chunks, the TCP connection dropped without a close handshake (a killed tab), ``GET /api/status`` polled
until no generation and no worker thread is left; on CUDA ``torch.cuda.memory_allocated`` before the first stream,
after the last one and after the disconnect (``leaked_mb``).

Prints ONE JSON line per stream ("measurement": "stream") and one for the disconnect test ("measurement":
"disconnect"), each self-contained (also appended to ``--output FILE``). Any ``error`` message from the server ends
the script with that message (exit status 1).

    python benchmarks/demo.py --model PATH_OR_HUB_ID --device cuda --realtime          # GPU, as raven-demo --realtime
    HF_HUB_OFFLINE=1 python benchmarks/demo.py --device cpu --streams 2 --length 33     # shipped world model on CPU
    HF_HUB_OFFLINE=1 python benchmarks/demo.py --device cpu --streams 2 --length 33 --pace video
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import struct
import sys
import threading
import time
import urllib.request

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: the prompt switched to in the last stream (a world caption: the shipped world model accepts only those)
SWITCH_PROMPT = "a blue square moves left slowly, on a white background"
FALLBACK_PROMPT = "a red circle moves right quickly, on a black background"


class ProtocolError(RuntimeError):
    """The server sent an ``error`` message, or something the page would not expect."""


# ----------------------------------------------------------------------------------------------------- the server
class LiveServer:
    """The app served by uvicorn in a daemon thread on 127.0.0.1 (a pre-bound free port, as tests/test_demo.py)."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.record_video = app.state.demo.settings.record_video
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="benchmark-uvicorn")

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start (see the log above)")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def get(self, path: str, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(self.base + path, timeout=timeout) as response:
            return response.read()

    def status(self) -> dict:
        return json.loads(self.get("/api/status"))

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """``/api/status`` once no generation runs and no worker thread is alive; ``RuntimeError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if not status["running"] and status["worker_threads"] == 0:
                return status
            if time.monotonic() > deadline:
                raise RuntimeError(f"the demo did not go idle within {timeout:.0f} s: {status}")
            time.sleep(0.02)


# ----------------------------------------------------------------------------------------------------- the page
class PageClient:
    """The page's side of the WebSocket (raven_video/demo/static/demo.js) without a browser.

    Frames (4-byte big-endian index + JPEG) are kept until "shown": at once (``pace="none"``) or at the video's fps
    with the page's clock (``pace="video"``); each shown frame is acknowledged with ``{"type": "shown", "frames": N}``.
    """

    def __init__(self, ws, pace: str, timeout: float):
        self.ws, self.pace, self.timeout = ws, pace, timeout
        self.begin()
        self.hello = self.next_message()
        if self.hello["type"] != "hello":
            raise ProtocolError(f"expected a hello message first, got {self.hello}")
        self.period = 1.0 / self.hello["fps"]

    def begin(self) -> None:
        """Forget the previous stream (the page's Start button)."""
        self.received = 0  # frames received
        self.pending: set[int] = set()  # received, not shown yet
        self.shown = 0
        self.next_due = 0.0
        self.first_frame_at: float | None = None
        self.show_times: list[float] = []
        self.stalls = 0
        self.hold = False  # True: show nothing for now (frames are kept)

    def send(self, **message) -> None:
        self.ws.send(json.dumps(message))

    def _show_due(self) -> bool:
        """Show (acknowledge) the next frame if it is here and due; True if one was shown."""
        now = time.perf_counter()
        if self.hold or self.shown not in self.pending or (self.pace == "video" and now < self.next_due):
            return False
        self.pending.discard(self.shown)
        # demo.js tick(): a frame later than one period restarts the clock instead of causing a burst
        late = now - self.next_due > self.period
        self.stalls += late and self.shown > 0  # the picture froze: the frame was not here in time
        self.next_due = now + self.period if late else self.next_due + self.period
        self.shown += 1
        self.show_times.append(now)
        self.send(type="shown", frames=self.shown)
        return True

    def _on_frame(self, data: bytes) -> None:
        (index,) = struct.unpack(">I", data[:4])
        if index != self.received or len(data) <= 4:
            raise ProtocolError(f"frame {index} ({len(data)} bytes) arrived, frame {self.received} was expected")
        if self.first_frame_at is None:
            self.first_frame_at = time.perf_counter()
        self.received += 1
        self.pending.add(index)

    def next_message(self) -> dict:
        """The next JSON message; frames on the way are received and shown. ``error`` raises :class:`ProtocolError`."""
        last_progress = time.perf_counter()
        while True:
            while self._show_due():
                last_progress = time.perf_counter()
            now = time.perf_counter()
            if now - last_progress > self.timeout:
                raise ProtocolError(f"nothing from the server for {self.timeout:.0f} s (--timeout)")
            wait = self.timeout - (now - last_progress)
            if not self.hold and self.shown in self.pending:  # the next frame waits for its display time
                wait = min(wait, max(0.0, self.next_due - now))
            try:
                data = self.ws.recv(timeout=wait)
            except TimeoutError:
                continue
            last_progress = time.perf_counter()
            if isinstance(data, bytes):
                self._on_frame(data)
                continue
            message = json.loads(data)
            if message.get("type") == "error":
                raise ProtocolError(f"the server says: {message.get('message')}")
            return message

    def display_fps(self) -> float | None:
        """Frames shown per second between the first and the last shown frame."""
        if len(self.show_times) < 2:
            return None
        return (len(self.show_times) - 1) / (self.show_times[-1] - self.show_times[0])

    def drop(self) -> None:
        """Drop the TCP connection without a WebSocket close handshake (a killed tab or a lost network)."""
        try:
            self.ws.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.ws.close()


def connect(url: str, timeout: float):
    """A WebSocket to the demo, as a browser opens it: no client pings, no 1 MiB message limit (large frames)."""
    from websockets.sync.client import connect as ws_connect

    return ws_connect(url, max_size=None, open_timeout=timeout, ping_interval=None)


# ----------------------------------------------------------------------------------------------------- measurements
def run_stream(client: PageClient, server: LiveServer, prompt: str, seed: int, length, switch_to: str | None) -> dict:
    """One stream from ``start`` to the ``video`` message (the mp4 downloaded); ``switch_to``: switch after chunk 0."""
    client.begin()
    chunks, switch, started, generated, switch_sent = [], None, None, None, False
    tic = time.perf_counter()
    client.send(type="start", prompt=prompt, seed=seed, length=length)
    while True:
        message = client.next_message()
        kind = message["type"]
        if kind == "started":
            started = message
        elif kind == "chunk":
            chunks.append(message)
            if switch_to and not switch_sent and message["index"] == 0 and message["num_chunks"] >= 3:
                # as the page's "Switch prompt" button. No frame is acknowledged until the reply, so the server
                # (at most `lead_chunks` = 2 chunks ahead) cannot have started the last chunk of a >= 4 chunk stream
                # however fast the device is.
                client.hold = True
                client.send(type="prompt", prompt=switch_to)
                switch_sent = True
        elif kind == "prompt":
            switch = message
            client.hold = False
        elif kind == "generated":
            generated = message
            generated_at = time.perf_counter()
        elif kind == "video":
            video = message
            break
    if started is None or generated is None:
        raise ProtocolError("the stream ended without a started or a generated message")
    total = generated_at - tic
    if generated["frames"] != started["num_frames"] or client.received != started["num_frames"]:
        raise ProtocolError(f"{started['num_frames']} frames asked, {generated['frames']} generated, "
                            f"{client.received} received")
    if [c["index"] for c in chunks] != list(range(started["num_chunks"])):
        raise ProtocolError(f"chunk indices {[c['index'] for c in chunks]} for {started['num_chunks']} chunks")
    if video["frames"] != client.shown or (server.record_video and not video.get("url")):
        raise ProtocolError(f"the video holds {video['frames']} frames ({video.get('url')}), {client.shown} were shown")
    display_fps = client.display_fps() if client.pace == "video" else None
    display_fps = round(display_fps, 2) if display_fps is not None else None
    if video["url"] is None:  # raven-demo --no_video: nothing recorded
        mp4_bytes = None
    else:
        mp4_bytes = len(server.get(video["url"]))
        if mp4_bytes <= 0:
            raise ProtocolError(f"the mp4 at {video['url']} is empty")

    prompt_switch = None
    if switch_sent:
        if switch is None:
            raise ProtocolError("the prompt switch got no reply")
        at = switch["chunk"]
        prompts = [c["prompt"] for c in chunks]
        ok = prompts[:at] == [prompt] * at and prompts[at:] == [switch_to] * (len(prompts) - at)
        if not ok:
            raise ProtocolError(f"switch announced at chunk {at}, chunk prompts were {prompts}")
        prompt_switch = {"sent_after_chunk": 0, "took_effect_chunk": at, "chunks_with_new_prompt": len(prompts) - at,
                         "prompt": switch_to}
    return {
        "seed": seed,
        "num_frames": started["num_frames"],
        "num_chunks": started["num_chunks"],
        "first_frame_latency_s": round(client.first_frame_at - tic, 4),
        "chunk_seconds": [c["seconds"] for c in chunks],
        "chunk_frames": [c["num_frames"] for c in chunks],
        "total_s": round(total, 4),
        "frames": client.received,
        "generation_fps": round(client.received / total, 2),
        "display_fps": display_fps,
        "display_stalls": client.stalls if client.pace == "video" else None,
        "video_frames": video["frames"],
        "video_s": round(time.perf_counter() - tic, 4),  # start to the mp4's URL (includes the play-out when paced)
        "mp4_bytes": mp4_bytes,
        "prompt_switch": prompt_switch,
    }


def run_disconnect(server: LiveServer, url: str, args, prompt: str, chunks: int = 3) -> dict:
    """An endless stream dropped after ``chunks`` chunks: time until the server has no generation and no worker."""
    before = server.status()
    with connect(url, args.timeout) as ws:
        client = PageClient(ws, args.pace, args.timeout)
        client.send(type="start", prompt=prompt, seed=0, length="endless")
        seen = 0
        while seen < chunks:
            if client.next_message()["type"] == "chunk":
                seen += 1
        at_close = server.status()
        tic = time.perf_counter()
        client.drop()
    idle = server.wait_idle(timeout=30.0)
    seconds = time.perf_counter() - tic
    if idle["cancelled"] != before["cancelled"] + 1:
        raise RuntimeError(f"the dropped stream was not counted as cancelled: {before} -> {idle}")
    return {"chunks_before_drop": chunks, "seconds_to_idle": round(seconds, 4),
            "chunks_generated_after_drop": idle["chunks"] - at_close["chunks"], "status": idle}


def cuda_memory_mb(device: torch.device) -> float | None:
    """``torch.cuda.memory_allocated`` in MB after ``gc.collect(); torch.cuda.empty_cache()``; ``None`` on a CPU."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    return round(torch.cuda.memory_allocated(device) / 2**20, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="CausalWanPipeline folder or Hub id (None: the shipped world model)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (None: cuda if available)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--realtime", action="store_true", help="pipe.enable_realtime() as raven-demo --realtime (CUDA)")
    p.add_argument("--streams", type=int, default=3, help="finite streams, seeds 0, 1, ...")
    p.add_argument("--length", type=int, default=81, help="frames per stream (whole chunks: 4k+1)")
    p.add_argument("--prompt", default=None, help="None: raven_video.world.shipped.EXAMPLE_CAPTION")
    p.add_argument("--pace", choices=["none", "video"], default="none",
                   help="acknowledge frames on arrival (generation speed) or at the video's fps (display rate)")
    p.add_argument("--no_video", action="store_true",
                   help="as raven-demo --no_video: no mp4 recording (where imageio-ffmpeg is not installed)")
    p.add_argument("--output", default=None, help="also append the JSON lines to this file")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for any message from the server")
    args = p.parse_args()
    if args.streams < 1:
        p.error("--streams must be >= 1")
    if args.prompt is None:
        try:
            from raven_video.world.shipped import EXAMPLE_CAPTION as default_prompt
        except ImportError:
            default_prompt = FALLBACK_PROMPT
        args.prompt = default_prompt

    from websockets.exceptions import ConnectionClosed

    from raven_video.cli.generate import UsageError
    from raven_video.demo import load_demo_pipeline
    from raven_video.demo.app import DemoSettings, create_app

    # as raven_video.demo.main
    pipe, folder = load_demo_pipeline(args.model, args.device, args.dtype)
    lookahead = 0
    if args.realtime:
        if pipe.device.type != "cuda":
            raise UsageError("--realtime needs a CUDA device (pipe.enable_realtime() compiles CUDA graphs).")
        pipe.enable_realtime()
        lookahead = 1  # the overlapped decode yields a chunk after the next one was started
    name = args.model or folder or "tiny random pipeline"
    settings = DemoSettings(switch_lookahead=lookahead, record_video=not args.no_video)
    app = create_app(pipeline=pipe, model=folder, settings=settings, model_name=name)
    device = pipe.device

    def emit(measurement: dict) -> None:
        demo = app.state.demo
        line = json.dumps({
            "benchmark": "demo",
            "date": datetime.date.today().isoformat(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__,
            "model_name": name,
            "resolution": f"{demo.height}x{demo.width}",
            "video_fps": demo.fps,
            "guidance_scale": demo.guidance_scale,
            **vars(args),  # including --device
            "device": str(device),
            **measurement,
        })
        print(line, flush=True)
        if args.output:
            with open(args.output, "a") as f:
                f.write(line + "\n")

    warmup = {0: "torch.compile", 1: "cuda_graph_capture"} if args.realtime else {}
    memory = {"before_first_stream": cuda_memory_mb(device)}
    try:
        with LiveServer(app) as server:
            url = f"ws://127.0.0.1:{server.port}/ws"
            with connect(url, args.timeout) as ws:  # one page, several streams (Start pressed again)
                client = PageClient(ws, args.pace, args.timeout)
                for i in range(args.streams):
                    last = i == args.streams - 1
                    result = run_stream(client, server, args.prompt, seed=i, length=args.length,
                                        switch_to=SWITCH_PROMPT if last else None)
                    emit({"measurement": "stream", "stream": i, "warmup": warmup.get(i), **result})
                server.wait_idle(timeout=args.timeout)
                memory["after_last_stream"] = cuda_memory_mb(device)

            result = run_disconnect(server, url, args, args.prompt)
            memory["after_disconnect"] = cuda_memory_mb(device)
            leaked = None if device.type != "cuda" else round(memory["after_disconnect"] - memory["after_last_stream"], 1)
            emit({"measurement": "disconnect", **result, "memory_mb": memory if device.type == "cuda" else None,
                  "leaked_mb": leaked})
    except (ProtocolError, RuntimeError, ConnectionClosed, OSError) as err:  # one line, as raven-demo's errors
        raise SystemExit(f"error: {type(err).__name__}: {err}") from None


if __name__ == "__main__":
    main()
