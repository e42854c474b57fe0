"""The one build step pyproject.toml cannot say: the shipped models (models/NAME of this
repository) go into the wheel as llada/shipped_models/NAME, where
`llada.model.checkpoint.resolve_checkpoint` finds them in an installed package. An editable
install reads models/ in place. All other metadata is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

MODELS = Path(__file__).resolve().parent / "models"


class BuildWithModels(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target_root = Path(self.build_lib) / "llada" / "shipped_models"
        for folder in sorted(MODELS.iterdir()) if MODELS.is_dir() else ():
            if not (folder / "config.json").is_file():
                continue
            for source in sorted(folder.iterdir()):
                if source.is_file():
                    target = target_root / folder.name / source.name
                    self.mkpath(str(target.parent))
                    self.copy_file(str(source), str(target))


setup(cmdclass={"build_py": BuildWithModels})
