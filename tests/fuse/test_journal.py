"""The open-files journal a serving process keeps for its successor after a crash."""
from __future__ import annotations

import os
import subprocess
import sys

from stargz_store.fuse.journal import JOURNAL_BYTES, RECORD, OpenFilesJournal


def test_what_a_killed_process_stored_is_replayed(tmp_path):
    path = tmp_path / "open-files.journal"
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from stargz_store.fuse.journal import OpenFilesJournal\n"
        "j = OpenFilesJournal(Path(sys.argv[1]))\n"
        "j.rewrite({'backing': [[7, 3, 1]], 'cached': [[9, 2]]})\n"
        "j.note(7, 20, 3, 1, 0); j.note(11, 22, 4, 1, 0); j.note(9, 24, 0, 0, -1); j.note(12, 26, 0, 0, 1)\n"
        "j.note(12, 28, 0, 0, -1)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], cwd=os.getcwd())
    files = OpenFilesJournal(path).replay()
    assert sorted(files["backing"]) == [[7, 3, 2], [11, 4, 1]]
    assert files["cached"] == [[9, 1]]
    assert files["applied"] == [20, 22, 24, 26, 28]  # a resent request among these is not counted again


def test_the_uniques_applied_survive_a_rewrite(tmp_path):
    journal = OpenFilesJournal(tmp_path / "j")
    journal.rewrite({"backing": [[5, 1, 2]], "cached": [], "applied": [40, 42]})
    journal.note(5, 44, 1, -1, 0)
    assert journal.replay() == {"backing": [[5, 1, 1]], "cached": [], "applied": [40, 42, 44]}
    journal.close()


def test_a_full_journal_is_rewritten_from_the_table(tmp_path):
    journal = OpenFilesJournal(tmp_path / "j")
    journal.rewrite({})
    notes = JOURNAL_BYTES // RECORD.size
    full_at = next(i for i in range(notes) if journal.note(5, 2 * i + 2, 1, 1 if i % 2 == 0 else -1, 0))
    assert full_at == notes - 1  # the last record fits; the session rewrites before the next
    journal.rewrite({"backing": [[5, 1, 1]], "cached": []})
    assert journal.replay() == {"backing": [[5, 1, 1]], "cached": [], "applied": []}
    assert journal.note(5, 2, 1, -1, 0) is False
    assert journal.replay() == {"backing": [], "cached": [], "applied": [2]}
    journal.close()
