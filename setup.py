"""Packages of rcd: the rcd* and hydra_plugins* packages, and rcd.conf, whose files are the top-level conf/ folder
(the Hydra configs live at the top of the repository and ship inside the wheel). Everything else is in
pyproject.toml."""
from setuptools import find_namespace_packages, setup

# hydra_plugins: the namespace Hydra scans for rcd's list sweeper
setup(packages=find_namespace_packages(include=["rcd*", "hydra_plugins*"]) + ["rcd.conf"],
      package_dir={"rcd.conf": "conf"})
