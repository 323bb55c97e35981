"""Build script. The Python package is pure; the native extension (csrc/) is added by the
native-kernels work and stays optional: without a compiler the package still installs."""
from setuptools import setup

setup()
