"""Package discovery only; all metadata lives in pyproject.toml.

frontends/ and backends/ sit at the top of the repository but install as moe_ir.frontends and
moe_ir.backends (see package-dir in pyproject.toml); their sub-packages are found here so that a new
backend folder needs no edit to the packaging.
"""
from setuptools import find_packages, setup


def _packages() -> list[str]:
    found = ["moe_ir", "moe_ir.frontends", "moe_ir.backends"]
    found += [f"moe_ir.{sub}" for sub in find_packages("moe_ir")]
    for folder in ("frontends", "backends"):
        found += [f"moe_ir.{folder}.{sub}" for sub in find_packages(folder)]
    return found


setup(packages=_packages())
