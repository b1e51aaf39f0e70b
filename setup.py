"""The optional C page hasher (dengine_cli/_pagehash.c), built against Debian's libxxhash
(libxxhash-dev); everything else about the package is in pyproject.toml.

Optional: where it cannot be compiled (no compiler, no libxxhash-dev), dengine installs without
it and hashes pages from Python, to the same hashes.  Here rather than in pyproject.toml, whose
``[tool.setuptools.ext-modules]`` setuptools still calls experimental.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("dengine_cli._pagehash", ["dengine_cli/_pagehash.c"], libraries=["xxhash"], optional=True)
    ]
)
