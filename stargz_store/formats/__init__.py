"""Pure layer formats: eStargz and zstd:chunked readers and writers, the TOC model. No I/O beyond the bytes handed in."""
