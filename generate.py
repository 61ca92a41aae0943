#!/usr/bin/env python
"""Text -> mp4 with a causal, KV-cached Wan2.1 student. See `python generate.py --help` and the README."""

from raven_video.cli.generate import main

if __name__ == "__main__":
    main()
