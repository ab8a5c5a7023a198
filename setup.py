"""The one build step pyproject.toml cannot declare: the wheel carries the files at the top of
the tree that mlxgate runs with (supervisord.conf, the built-in plugins, the boot service's
templates) as package data in mlxgate/data/, where `mlxgate.project_files` finds them when
mlxgate is not run from a checkout. In the tree they stay where they are."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

TOP_LEVEL_DATA = ("supervisord.conf", "plugins/*.py", "launchd/*", "systemd/*")  # globs from the top of the tree
INSTALLED_DATA = Path("mlxgate", "data")               # `project_files.INSTALLED_DATA`


def top_level_files() -> list[str]:
    return sorted(str(path) for pattern in TOP_LEVEL_DATA for path in Path().glob(pattern))


class BuildPy(build_py):
    """build_py, plus copies of the top-level data; an editable install reads the tree's own."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for name in top_level_files():
            target = Path(self.build_lib, INSTALLED_DATA, name)
            self.mkpath(str(target.parent))
            self.copy_file(name, str(target))

    def get_source_files(self) -> list[str]:
        return [*super().get_source_files(), *top_level_files()]  # what the sdist holds


setup(cmdclass={"build_py": BuildPy})
