#!/usr/bin/env python
"""Train a student (or a teacher with distiller=none). See `python tools/train.py --help`."""
from distill.cli import main

if __name__ == "__main__":
    main()
