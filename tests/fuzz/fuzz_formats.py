"""Coverage-guided fuzzing of the format parsers with atheris (libFuzzer): `make fuzz`.

    make fuzz                       # FUZZ_SECONDS (default 300) of fuzzing
    python -m tests.fuzz.fuzz_formats -max_total_time=60 [libFuzzer flags]

Every input goes through `tests.formats.hostile.run_input`: its first byte picks a parser (a
footer, a whole eStargz or zstd:chunked blob, TOC JSON inside a valid blob, a TOC member, a
tar-split stream, a tar, a chunk), which must produce a valid model or raise a `FormatError`.
Any other exception, an input taking longer than `-timeout` seconds, or the process growing past
`-rss_limit_mb` is a finding: libFuzzer writes the input to `fuzz-artifacts/` and stops. Keep
each finding as a regression test: copy the file into `tests/formats/fuzz_regressions/` (named
`<target>-<what>.bin`), fix the parser, and `test_fuzz_regressions.py` replays it in CI.

The corpus grows in `fuzz-artifacts/corpus` (seeded with one valid input per target) and is
reused by the next run. Not part of `make test`: it runs until its time is up.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["stargz_store.formats", "tests.formats.hostile"]):
    from tests.formats import hostile

ARTIFACTS = Path(os.environ.get("FUZZ_ARTIFACTS", "fuzz-artifacts"))


def test_one_input(data: bytes) -> None:
    hostile.run_input(data)


def main(argv: list[str]) -> None:
    corpus = ARTIFACTS / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for name, seed in hostile.seeds().items():
        path = corpus / f"seed-{name}"
        if not path.exists():
            path.write_bytes(seed)
    flags = [
        f"-artifact_prefix={ARTIFACTS}/",
        "-timeout=10",          # seconds one input may take: a hang is a finding
        "-rss_limit_mb=1536",   # caps in `hostile.LIMITS` are small: far more memory is a finding
        "-max_len=262144",
    ]
    atheris.Setup([argv[0], *flags, *argv[1:], str(corpus)], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
