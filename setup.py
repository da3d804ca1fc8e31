"""Maps the repository's shipped folders into the package (the rest is in setup.cfg)."""

from setuptools import find_packages, setup

SHIPPED = {"stemnet.configs": "configs", "stemnet.jobs": "jobs", "stemnet.micrograph": "demo/micrograph"}

setup(
    packages=find_packages(include=["stemnet", "stemnet.*", "simulation", "simulation.*"]) + list(SHIPPED),
    package_dir=SHIPPED,
)
