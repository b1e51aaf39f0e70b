"""Coverage-guided fuzzing of the readers with atheris (libFuzzer for Python), beside the
mutation campaign of ``python -m tests.fuzz``.

    .venv/bin/pip install atheris          # or: pip install -e '.[fuzz]'
    .venv/bin/python -m tests.fuzz.atheris_target --make-corpus fuzz-corpus
    .venv/bin/python -m tests.fuzz.atheris_target fuzz-corpus -rss_limit_mb=2048 -timeout=20 -runs=100000

Each input is written to a file and opened the way every command opens a dump (magic probing,
compressed containers, then the reader), then every page is read once, as ``info`` does.  A
DengineError is the expected answer to a bad dump; any other exception is a crash that libFuzzer
saves (``crash-<sha1>``): reproduce it with ``dengine --debug info crash-<sha1>``, then add it to
tests/test_fuzz_regressions.py.  libFuzzer's ``-timeout`` and ``-rss_limit_mb`` catch hangs and
runaway allocations.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["dengine_cli"]):
    from dengine_cli.errors import DengineError
    from dengine_cli.formats import OpenOptions, all_formats, open_dump
    from dengine_cli.inspect import zero_mask

    all_formats()  # import (so instrument) every reader now, not on the first input of its magic
_DIR = tempfile.mkdtemp(prefix="dengine-atheris-")
_PATH = os.path.join(_DIR, "input.dump")
_OPTIONS = OpenOptions(tmp_dir=Path(_DIR))


def one_input(data: bytes) -> None:
    with open(_PATH, "wb") as f:
        f.write(data)
    try:
        with open_dump(_PATH, _OPTIONS) as dump:
            for batch in dump.batches():
                zero_mask(batch.pages)
            dump.ranges()
            dump.facts.to_dict()
    except DengineError:
        pass
    leftovers = sorted(set(os.listdir(_DIR)) - {"input.dump"})
    if leftovers:
        raise AssertionError(f"temporary files left behind: {leftovers}")


def make_corpus(folder: Path) -> None:
    """Write every seed of the mutation campaign into ``folder`` (libFuzzer's starting corpus)."""
    from tests.fuzz.seeds import all_seeds, wrap

    folder.mkdir(parents=True, exist_ok=True)
    for s in all_seeds():
        (folder / s.name).write_bytes(wrap(s.wrap, s.data) if s.wrap else s.data)
    print(f"{len(all_seeds())} seeds in {folder}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--make-corpus":
        make_corpus(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
