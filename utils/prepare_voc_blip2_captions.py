"""BLIP-2 captions for voc: ``utils/prepare_captions.py --dataset voc --mode blip2``, kept
under the name the authors' README uses. Any flag of prepare_captions can be added.

    python -m utils.prepare_voc_blip2_captions --split train --model /models/blip2-opt-2.7b
"""
from __future__ import annotations

import sys

from utils import prepare_captions


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return prepare_captions.main(["--dataset", "voc", "--mode", "blip2", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
