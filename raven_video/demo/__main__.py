"""``python -m raven_video.demo``: the browser demo (docs/demo.md)."""

from . import main

if __name__ == "__main__":
    main()
