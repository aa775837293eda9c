"""The one thing pyproject.toml cannot say: the shipped configs live in configs/ at the top of the checkout, where
people read and edit them, and install as the package data retrieval/configs/ beside the code, so that
`retrieval.workflows.shipped_config(name)` finds them in a wheel as in a checkout. Everything else is in
pyproject.toml."""

from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["retrieval*"]) + ["retrieval.configs"],
    package_dir={"retrieval.configs": "configs"},
)
