"""The browser demo (raven_video.demo): WebSocket protocol, queueing, cancellation and leaks with Starlette's
TestClient, then the real page in headless Chromium (Playwright driving the Debian `chromium`)."""

import gc
import io
import json
import os
import shutil
import socket
import struct
import threading
import time
import tracemalloc

import anyio
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from raven_video.demo import app as demo_app
from raven_video.demo.app import DemoSettings, create_app
from raven_video.testing import tiny_pipeline
from raven_video.utils.video_io import to_uint8_frames

H, W = 32, 48  # 9-frame first chunk, then 12 frames per chunk; ~0.5 s per chunk on 2 CPU cores
WORLD_CAPTION = "a red circle moves right quickly, on a black background"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


def make_app(pipe, **settings):
    return create_app(pipeline=pipe, settings=DemoSettings(height=H, width=W, default_frames=33, **settings))


class Client:
    """A TestClient WebSocket that acknowledges every frame as shown (as the page does), with receive timeouts."""

    def __init__(self, ws, ack=True):
        self.ws, self.ack = ws, ack
        self.frames: dict[int, bytes] = {}
        self.messages: list[dict] = []
        self.hello = self.next_message()
        assert self.hello["type"] == "hello"

    def _receive(self, timeout):
        async def receive():
            with anyio.fail_after(timeout):
                return await self.ws._send_rx.receive()

        return self.ws.portal.call(receive)

    def next_message(self, timeout=30.0):
        """The next JSON message; binary frames on the way are stored (and acknowledged)."""
        while True:
            message = self._receive(timeout)
            assert message["type"] == "websocket.send", message
            if message.get("bytes") is not None:
                (index,) = struct.unpack(">I", message["bytes"][:4])
                self.frames[index] = message["bytes"][4:]
                if self.ack:
                    self.send(type="shown", frames=len(self.frames))
                continue
            data = json.loads(message["text"])
            self.messages.append(data)
            return data

    def until(self, kind, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            message = self.next_message(max(deadline - time.monotonic(), 0.01))
            if message["type"] == kind:
                return message
            assert message["type"] != "error" or kind == "error", message

    def quiet_for(self, seconds):
        """JSON messages received within ``seconds`` (none expected: returns them for the assertion)."""
        got = []
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                got.append(self.next_message(max(deadline - time.monotonic(), 0.01)))
        except TimeoutError:
            pass
        return got

    def send(self, **data):
        self.ws.send_text(json.dumps(data))

    def decoded(self, index):
        return np.asarray(Image.open(io.BytesIO(self.frames[index])).convert("RGB"))


def wait_idle(demo, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = demo.status()
        if not status["running"] and status["worker_threads"] == 0 and not status["waiting"]:
            return status
        time.sleep(0.05)
    raise AssertionError(f"the demo did not go idle: {demo.status()}")


def first_chunk(pipe, seed):
    stream = pipe.stream("a cat walks", num_frames=33, height=H, width=W, generator=torch.Generator().manual_seed(seed))
    try:
        return next(stream)
    finally:
        stream.close()


# ------------------------------------------------------------------------------------------- server level
def test_stream_switch_prompt_seed_and_mp4(pipe):
    app = make_app(pipe)
    with TestClient(app) as http:
        assert "RAVEN-video" in http.get("/").text
        config = http.get("/api/config").json()
        # tiny model: chunks of 3 latent frames, RoPE table 1024 -> 1023 latent frames = 4089 pixel frames
        assert (config["fps"], config["endless_frames"], config["chunk_frames"]) == (16, 4089, 12)
        assert http.get("/video/../../etc/passwd.mp4").status_code == 404
        with http.websocket_connect("/ws") as ws:
            client = Client(ws)
            client.send(type="start", prompt="a cat walks", seed=7, length=33)
            started = client.until("started")
            assert (started["num_frames"], started["num_chunks"], started["seed"]) == (33, 3, 7)
            first = client.until("chunk")
            assert (first["index"], first["frame_start"], first["num_frames"]) == (0, 0, 9)
            client.send(type="prompt", prompt="a dog runs")
            switch = client.until("prompt")
            assert switch["chunk"] in (1, 2)  # the next chunk the pipeline has not started
            chunks = [first, client.until("chunk"), client.until("chunk")]
            assert [c["prompt"] for c in chunks][switch["chunk"]:] == ["a dog runs"] * (3 - switch["chunk"])
            assert [c["prompt"] for c in chunks][:switch["chunk"]] == ["a cat walks"] * switch["chunk"]
            assert client.until("generated")["frames"] == 33
            video = client.until("video")
            assert video["frames"] == 33 and sorted(client.frames) == list(range(33))
            shown = np.stack([client.decoded(i) for i in range(33)])
            assert shown.shape == (33, H, W, 3) and np.abs(shown[0].astype(int) - shown[30]).mean() > 1  # frames change
            mp4 = http.get(video["url"])
            assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
            frames = iio.imread(mp4.content, extension=".mp4", plugin="pyav")
            assert frames.shape == (33, H, W, 3)
            # the mp4 holds what was shown, in order (JPEG and H.264 of noise are both lossy: compare relatively)
            error = np.abs(frames.astype(int) - shown).mean(axis=(1, 2, 3))
            shifted = np.abs(frames.astype(int) - np.roll(shown, 1, axis=0)).mean(axis=(1, 2, 3))
            assert (error < 0.7 * shifted).all()
        # the seed is the pipeline's seed: chunk 0 equals a direct stream with the same generator seed
        direct = first_chunk(pipe, seed=7)
        expected = [Image.open(io.BytesIO(demo_app.jpeg_bytes(frame, 90))).convert("RGB")
                    for frame in to_uint8_frames(direct.frames[0])]
        assert np.abs(shown[:9].astype(int) - np.stack(expected)).max() <= 1
        other = first_chunk(pipe, seed=8)
        assert np.abs(to_uint8_frames(other.frames[0]).astype(int) - shown[:9]).mean() > 10  # another seed differs
        wait_idle(app.state.demo)
        assert not os.listdir(app.state.demo.videos_dir)  # the page closed: its video is deleted


def test_every_stream_runs_on_one_model_thread(pipe, monkeypatch):
    """Each job has its own thread, but the model code of every stream runs on the demo's one model thread: PyTorch
    keeps cuDNN's execution plans per thread, and a fresh thread per stream re-planned every convolution."""
    app = make_app(pipe)
    ran_on, job_threads = [], []
    stream = pipe.stream

    def recording_stream(*args, **kwargs):
        job_threads.append(threading.current_thread())  # the job's thread creates the generator

        def chunks():
            for chunk in stream(*args, **kwargs):
                ran_on.append(threading.current_thread())
                yield chunk
        return chunks()

    monkeypatch.setattr(pipe, "stream", recording_stream)
    with TestClient(app) as http:
        for seed in (0, 1):
            with http.websocket_connect("/ws") as ws:
                client = Client(ws)
                client.send(type="start", prompt="a cat walks", seed=seed, length=21)
                assert client.until("generated")["frames"] == 21
                client.until("video")
            wait_idle(app.state.demo)
    assert len(ran_on) == 4 and len(set(ran_on)) == 1  # 2 streams x 2 chunks, one thread
    assert len(set(job_threads)) == 2 and ran_on[0] not in job_threads


def test_pause_resume_stop_ends_video_at_shown_frame(pipe):
    app = make_app(pipe)
    with TestClient(app) as http, http.websocket_connect("/ws") as ws:
        client = Client(ws, ack=False)
        client.send(type="start", prompt="a cat walks", seed=0, length="endless")
        started = client.until("started")
        assert started["endless"] and started["num_frames"] == 4089 and started["num_chunks"] == 341
        assert app.state.demo.limits.endless_window == {"local_attn_size": 21, "sink_size": 3}
        client.until("chunk")
        client.send(type="pause")
        client.until("paused")
        client.send(type="shown", frames=9)  # (lead_chunks=2: without pause two more chunks would come)
        late = [m for m in client.quiet_for(1.5) if m["type"] == "chunk"]
        assert len(late) <= 1  # at most the chunk already under way when pause arrived
        assert not [m for m in client.quiet_for(1.5) if m["type"] == "chunk"], "generation went on while paused"
        client.send(type="resume")
        resumed = client.until("chunk")
        assert resumed["index"] == 1 + len(late)
        client.send(type="stop", shown=14)  # the page had drawn 14 frames when stop was pressed
        assert client.until("generated")["stopped"]
        video = client.until("video")
        assert video["frames"] == 14 and len(client.frames) > 14
        assert iio.imread(http.get(video["url"]).content, extension=".mp4", plugin="pyav").shape[0] == 14
        client.ack = True
        # a new stream in the same page replaces the previous video
        client.send(type="start", prompt="a bird flies", seed=1, length=33)
        assert client.until("video")["frames"] == 33
        assert len(os.listdir(app.state.demo.videos_dir)) == 1


def test_no_video_setting_streams_without_recording(pipe, monkeypatch):
    from raven_video.utils import video_io

    def no_encoder(*args, **kwargs):
        raise AssertionError("an mp4 writer was opened with record_video=False")

    monkeypatch.setattr(video_io, "AtomicVideoWriter", no_encoder)
    app = make_app(pipe, record_video=False)
    with TestClient(app) as http, http.websocket_connect("/ws") as ws:
        client = Client(ws)
        client.send(type="start", prompt="a cat walks", seed=0, length=33)
        assert client.until("generated")["frames"] == 33
        video = client.until("video")
        assert video["frames"] == 33 and video["url"] is None and len(client.frames) == 33
        assert os.listdir(app.state.demo.videos_dir) == []


def test_generation_waits_for_the_page(pipe):
    """Backpressure: without acknowledgements the server stays `lead_chunks` chunks ahead and no further."""
    app = make_app(pipe, lead_chunks=1)
    with TestClient(app) as http, http.websocket_connect("/ws") as ws:
        client = Client(ws, ack=False)
        client.send(type="start", prompt="a cat", length="endless")
        client.until("chunk"), client.until("chunk")  # 9 + 12 frames: 21 > 12 = one chunk ahead
        assert not [m for m in client.quiet_for(2.0) if m["type"] == "chunk"]
        client.send(type="shown", frames=21)
        assert client.until("chunk")["index"] == 2


@pytest.mark.parametrize("message,expected", [
    ({"type": "start", "prompt": "   "}, "the prompt is empty"),
    ({"type": "start", "prompt": "a cat " * 100}, "at most 400"),
    ({"type": "start", "prompt": "a cat", "seed": -1}, "seed -1 must be a whole number in 0..4294967295"),
    ({"type": "start", "prompt": "a cat", "seed": "abc"}, "seed 'abc' must be"),
    ({"type": "start", "prompt": "a cat", "length": 80}, "length 80 frames is not of the form 4k+1; use 69 or 81"),
    ({"type": "start", "prompt": "a cat", "length": 29}, "does not fit the chunks"),
    ({"type": "start", "prompt": "a cat", "length": 10**6}, "out of range: 1..4089"),
    ({"type": "start", "prompt": "a cat", "length": "forever"}, "a number of frames (e.g. 81) or \"endless\""),
    ({"type": "prompt", "prompt": "a dog"}, "no stream is running"),
    ({"type": "dance"}, "unknown message type 'dance'"),
    ("{not json", "must be a JSON object"),
])
def test_bad_input_gets_a_message_not_a_traceback(pipe, message, expected):
    app = make_app(pipe)
    with TestClient(app) as http, http.websocket_connect("/ws") as ws:
        client = Client(ws)
        ws.send_text(message if isinstance(message, str) else json.dumps(message))
        error = client.until("error")
        assert expected in error["message"] and "Traceback" not in error["message"]
        client.send(type="start", prompt="a cat", length=9)  # the session still works
        assert client.until("video")["frames"] == 9


def test_world_model_vocabulary_is_checked(pipe, tmp_path):
    from raven_video.world.stack import world_tokenizer

    world_tokenizer().save_pretrained(tmp_path / "tokenizer")  # generate.check_world_prompts reads this file
    app = create_app(pipeline=pipe, model=str(tmp_path), settings=DemoSettings(height=H, width=W))
    demo = app.state.demo
    assert demo.world_vocabulary and demo.check_prompt(WORLD_CAPTION) == WORLD_CAPTION
    with TestClient(app) as http, http.websocket_connect("/ws") as ws:
        client = Client(ws)
        assert client.hello["world_vocabulary"] and "red circle" in client.hello["example_prompt"]
        client.send(type="start", prompt="a purple elephant dances")
        error = client.until("error")["message"]
        assert "'dances', 'elephant' not in the world model's vocabulary" in error
    assert create_app(pipeline=pipe, settings=DemoSettings(height=H, width=W)).state.demo.world_vocabulary is None


def test_one_generation_at_a_time_queue_then_refusal(pipe):
    app = make_app(pipe, max_waiting=1)
    demo = app.state.demo
    with TestClient(app) as http:
        with http.websocket_connect("/ws") as ws_a, http.websocket_connect("/ws") as ws_b, \
                http.websocket_connect("/ws") as ws_c:
            a, b, c = Client(ws_a), Client(ws_b), Client(ws_c)
            a.send(type="start", prompt="a cat", length="endless")
            a.until("chunk")
            b.send(type="start", prompt="a dog", length=33)
            assert b.until("queued")["position"] == 1
            c.send(type="start", prompt="a bird", length=33)
            assert "the demo is busy" in c.until("error")["message"]
            assert demo.status()["waiting"] == 1 and demo.status()["worker_threads"] == 1
            b.send(type="prompt", prompt="a dog swims")  # while queued: it starts with the new prompt
            assert b.until("prompt")["chunk"] == 0
            a.send(type="stop", shown=3)
            assert a.until("video")["frames"] == 3
            started = b.until("started")  # the GPU passes to the next in line
            assert started["prompt"] == "a dog swims"
            assert b.until("video")["frames"] == 33
            c.send(type="start", prompt="a bird", length=9)  # free again
            assert c.until("video")["frames"] == 9
    assert wait_idle(demo)["generations"] == 3


def _live_jobs(timeout=5.0):
    """Jobs and sessions still in memory once the session's cleanup task has run (polled: it ends just after)."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        live = sum(isinstance(o, (demo_app.GenerationJob, demo_app.DemoSession)) for o in gc.get_objects())
        if live == 0 or time.monotonic() > deadline:
            return live
        time.sleep(0.05)


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_disconnect_stops_generation_without_leaks(pipe):
    app = make_app(pipe)
    demo = app.state.demo
    cycles, sizes = 5, []
    with TestClient(app) as http:
        wait_idle(demo)
        tracemalloc.start()
        try:
            for cycle in range(cycles):
                with http.websocket_connect("/ws") as ws:
                    client = Client(ws)
                    client.send(type="start", prompt="a cat walks", seed=cycle, length="endless")
                    client.until("chunk")
                    if cycle == 0:
                        threads_running = threading.active_count()
                # the page is gone mid-stream: the worker stops after at most the chunk under way
                status = wait_idle(demo, timeout=15)
                assert status["cancelled"] == cycle + 1
                gc.collect()
                if cycle == 0:
                    threads_idle = threading.active_count()
                    assert threads_idle == threads_running - 1  # the worker thread is gone
                assert threading.active_count() == threads_idle
                assert _live_jobs() == 0 and not os.listdir(demo.videos_dir)
                sizes.append((tracemalloc.get_traced_memory()[0], _rss_mb()))
            chunks = demo.status()["chunks"]
            time.sleep(1.0)
            assert demo.status()["chunks"] == chunks  # no orphan generation
        finally:
            tracemalloc.stop()
    traced_growth = sizes[-1][0] - sizes[1][0]
    rss_growth = sizes[-1][1] - sizes[1][1]
    print(f"\ndisconnect cycles: traced Python heap {sizes[1][0] / 2**20:.2f} -> {sizes[-1][0] / 2**20:.2f} MiB, "
          f"RSS {sizes[1][1]:.0f} -> {sizes[-1][1]:.0f} MiB over {cycles - 2} cycles")
    assert traced_growth < 1 * 2**20, f"Python heap grew by {traced_growth / 2**20:.2f} MiB"
    assert rss_growth < 64, f"RSS grew by {rss_growth:.0f} MiB"


def test_main_falls_back_to_the_tiny_pipeline(monkeypatch, capsys, pipe):
    import uvicorn

    from raven_video import demo
    from raven_video.cli import generate

    served = {}
    monkeypatch.setattr(generate, "shipped_model", lambda: None)
    monkeypatch.setattr(generate, "load_pipeline", lambda args: pipe if args.model is None else pytest.fail())
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: served.update(app=app, host=host, port=port))
    demo.main(["--port", "7999", "--guidance_scale", "1.5", "--no_video"])
    assert "no shipped world model in this installation yet" in capsys.readouterr().err
    assert served["port"] == 7999 and served["app"].state.demo.guidance_scale == 1.5
    assert served["app"].state.demo.settings.record_video is False
    with pytest.raises(SystemExit, match="is not a folder"):
        demo.main(["--model", "/nonexistent/model"])
    with pytest.raises(SystemExit, match="--realtime needs a CUDA device"):
        demo.main(["--realtime", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--guidance_scale 0.5 must be"):
        demo.main(["--guidance_scale", "0.5"])


def test_main_takes_the_real_time_levers(monkeypatch, tmp_path, pipe):
    """generate.py's lever flags: the GPU ones need --realtime, --preview serves the model folder's preview decoder
    (on CPU, without the compiled path); a missing one is an error before any weight loads."""
    import uvicorn

    from raven_video import demo
    from raven_video.cli import generate
    from raven_video.pipelines.preview_decoder import TAEHVDecoder

    served = {}
    monkeypatch.setattr(generate, "shipped_model", lambda: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: served.update(app=app))
    with pytest.raises(SystemExit, match="--fp8, --vae_device are options of the real-time path; add --realtime"):
        demo.main(["--fp8", "--vae_device", "cuda:1"])
    monkeypatch.setattr(generate, "load_pipeline", lambda args: pytest.fail("loaded before the levers were checked"))
    with pytest.raises(SystemExit, match="--preview: the tiny random stand-in model has no preview_decoder/ folder"):
        demo.main(["--preview"])
    monkeypatch.undo()
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: served.update(app=app))
    pipe.save_pretrained(tmp_path / "model")
    TAEHVDecoder().save_pretrained(tmp_path / "model" / "preview_decoder")
    demo.main(["--model", str(tmp_path / "model"), "--device", "cpu", "--preview", "--no_video"])
    served_pipe = served["app"].state.demo.pipe
    assert isinstance(served_pipe._preview_decoder, TAEHVDecoder) and served_pipe._overlap_decode is False


def test_load_demo_pipeline_from_folder(tmp_path, pipe):
    from raven_video.demo import load_demo_pipeline

    pipe.save_pretrained(tmp_path / "model")
    loaded, folder = load_demo_pipeline(str(tmp_path / "model"), device="cpu")
    assert folder == str(tmp_path / "model") and loaded.config.fps == 16
    assert type(loaded).__name__ == "CausalWanPipeline"


# ------------------------------------------------------------------------------------------- in a browser
CHROMIUM = shutil.which("chromium")
browser_only = pytest.mark.skipif(CHROMIUM is None, reason="Debian `chromium` is not installed (apt-get install "
                                                          "chromium); .ci/run installs it")


@pytest.fixture(scope="module")
def live_server(pipe):
    import uvicorn

    app = make_app(pipe, max_waiting=1)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield app.state.demo, f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def browser(live_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


def _state(page, key):
    return page.evaluate(f"window.demoState.{key}")


def _canvas_digest(page):
    return page.evaluate("""() => { const c = document.getElementById('screen');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let h = 0; for (let i = 0; i < d.length; i += 7) h = (h * 31 + d[i]) >>> 0; return h; }""")


@browser_only
def test_browser_stream_switch_stop_and_download(browser, live_server, tmp_path):
    demo, url = live_server
    page = browser.new_page()
    page.goto(url)
    page.wait_for_function("!document.getElementById('start').disabled")
    assert "4089 frames" in page.inner_text("#endless-hint") and "1024 latent" in page.inner_text("#endless-hint")
    page.fill("#prompt", "")
    page.click("#start")
    page.wait_for_function("document.getElementById('message').textContent.includes('the prompt is empty')")
    page.fill("#prompt", "a cat walks")
    page.fill("#length", "105")  # 9 chunks
    page.click("#start")
    page.wait_for_function("window.demoState.shown >= 4", timeout=30000)
    digest = _canvas_digest(page)
    page.wait_for_function("window.demoState.shown >= 14", timeout=30000)
    assert _canvas_digest(page) != digest  # the picture changes
    assert float(page.inner_text("#stat-latency").split()[0]) > 0
    page.fill("#prompt", "a dog runs")
    page.click("#switch")
    page.wait_for_function("window.demoState.chunks.some(c => c.prompt === 'a dog runs')", timeout=30000)
    shown = _state(page, "shown")
    page.wait_for_function(f"window.demoState.shown > {shown + 6}", timeout=30000)  # the stream goes on
    page.wait_for_function("document.getElementById('shown-prompt').textContent === 'a dog runs'", timeout=30000)
    assert 1 <= _state(page, "fps") <= 17  # paced at 16 fps, never faster
    page.click("#stop")
    page.wait_for_selector("#download:not([hidden])", timeout=30000)
    video = _state(page, "video")
    assert video["frames"] >= shown + 6
    with page.expect_download() as download:
        page.click("#download")
    path = tmp_path / "shown.mp4"
    download.value.save_as(path)
    frames = iio.imread(path, plugin="pyav")
    assert frames.shape == (video["frames"], H, W, 3)
    page.close()
    wait_idle(demo)


@browser_only
def test_browser_queue_refusal_and_disconnect(browser, live_server):
    demo, url = live_server
    pages = [browser.new_page() for _ in range(3)]
    for page in pages:
        page.goto(url)
        page.wait_for_function("!document.getElementById('start').disabled")
    first, second, third = pages
    cancelled = demo.status()["cancelled"]
    first.check("#endless")
    first.click("#start")
    first.wait_for_function("window.demoState.shown >= 2", timeout=30000)
    second.click("#start")
    second.wait_for_function("document.getElementById('status').textContent.includes('position 1 in the queue')")
    third.click("#start")
    third.wait_for_function("document.getElementById('message').textContent.includes('the demo is busy')")
    first.close()  # disconnect mid-stream: its generation stops and the GPU passes to the second page
    second.wait_for_function("window.demoState.shown >= 2", timeout=30000)
    status = demo.status()
    assert status["cancelled"] == cancelled + 1 and status["worker_threads"] == 1
    second.click("#stop")
    second.wait_for_selector("#download:not([hidden])", timeout=30000)
    for page in (second, third):
        page.close()
    wait_idle(demo)
