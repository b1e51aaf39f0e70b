"""The page store: ``dengine apply`` writes what a host would hold under a plan (each kept content
once, each patched page as its patch, each compressed page compressed, zero pages as nothing),
``dengine restore`` gives any VM back byte for byte, ``dengine verify`` checks every byte.

The layout is :mod:`dengine_cli.store.layout`; why it is so, docs/ARCHITECTURE.md ("The page
store").  Modules: ``planread`` (the plan file), ``objects`` (numbering), ``encode`` (a batch's
checks and codecs), ``frames`` (``--pack``), ``packs`` and ``catalog`` (the files), ``writer`` (one
apply's crash-safe writing), ``apply``, ``reader`` (decoding objects, checked), ``restore`` (raw
and ELF images), ``verify``.
"""
