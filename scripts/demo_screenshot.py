"""Screenshot of the browser demo with a running stream (docs/demo.png), taken with headless Chromium.

Serves the demo in this process (uvicorn in a thread), drives the page with Playwright (the system `chromium`, no
`playwright install`): start a stream, switch the prompt once, screenshot while frames play, print the page's numbers
(first-frame latency, display FPS, per-chunk times) as one JSON line.

    python scripts/demo_screenshot.py                       # shipped world model, else the tiny random pipeline
    python scripts/demo_screenshot.py --model PATH --out docs/demo.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="Pipeline folder (None: the shipped world model, else tiny random).")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "demo.png"))
    p.add_argument("--prompt", default=None, help="First prompt (None: the page's example).")
    p.add_argument("--switch_prompt", default=None, help="Prompt switched to after the first chunks (None: derived).")
    p.add_argument("--seconds", type=float, default=6.0, help="How long the stream runs before the screenshot.")
    p.add_argument("--length", default="endless", help="Frames, or 'endless'.")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import uvicorn
    from playwright.sync_api import sync_playwright

    from raven_video.demo import load_demo_pipeline
    from raven_video.demo.app import DemoSettings, create_app

    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("error: no `chromium` on PATH; apt-get install chromium")
    shipped = os.path.join(ROOT, "raven_video", "world", "weights", "pipeline", "model_index.json")
    model = args.model or (os.path.dirname(shipped) if os.path.isfile(shipped) else None)
    pipe, folder = load_demo_pipeline(model, device="cpu")
    name = model or "tiny random pipeline (no shipped world model yet)"
    app = create_app(pipeline=pipe, model=folder, settings=DemoSettings(), model_name=name)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                                 args=["--no-sandbox", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1240, "height": 900}, device_scale_factor=1)
            page.goto(url)
            page.wait_for_function("!document.getElementById('start').disabled")
            first = args.prompt or page.input_value("#prompt")
            page.fill("#prompt", first)
            if args.length == "endless":
                page.check("#endless")
            else:
                page.fill("#length", args.length)
            page.click("#start")
            page.wait_for_function("window.demoState.shown >= 1", timeout=120_000)
            page.wait_for_function("window.demoState.chunks.length >= 2", timeout=120_000)
            second = args.switch_prompt or (first.replace("red", "blue").replace("right", "left")
                                            if first.replace("red", "blue") != first else first + ", at night")
            page.fill("#prompt", second)
            page.click("#switch")
            time.sleep(args.seconds)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            page.screenshot(path=args.out)
            state = page.evaluate("""() => { const s = window.demoState; return {shown: s.shown, received: s.received,
                fps: s.fps, latency: s.latency, chunk_seconds: s.chunks.map(c => c.seconds),
                chunk_frames: s.chunks.map(c => c.num_frames), prompts: [...new Set(s.chunks.map(c => c.prompt))]}; }""")
            page.click("#stop")
            page.wait_for_selector("#download:not([hidden])", timeout=60_000)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    seconds = state["chunk_seconds"][1:] or state["chunk_seconds"]
    frames = state["chunk_frames"][1:] or state["chunk_frames"]
    state.update(model=name, size=f"{app.state.demo.width}x{app.state.demo.height}", fps_video=app.state.demo.fps,
                 generation_fps=round(sum(frames) / sum(seconds), 2), screenshot=args.out)
    print(json.dumps(state))
    return state


if __name__ == "__main__":
    main()
