"""Import readahead: a Python module read, the modules it imports at its top level found where
Python would find them in the image's merged layers, fetched before Python asks, and theirs in
turn; nothing a function imports, nothing that is not there."""
from __future__ import annotations

import importlib.util
import marshal
import random
import tarfile

import pytest

from stargz_store.formats.toc import build_toc
from stargz_store.layer import LayerConfig
from stargz_store.layer.policies.imports import ImportReadahead, ModuleFile, ModuleFinder, module_file
from stargz_store.layer.pyimports import PYC_MAGIC_311, Import

from .conftest import lazy_config
from .helpers import layer_of, tar_member, wait_until

STDLIB = "usr/lib/python3.11"
SITE = "usr/lib/python3/dist-packages"


def _pyc(source: str) -> bytes:
    return importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(compile(source, "m.py", "exec"))


def test_module_files_say_where_they_are():
    assert module_file(f"{SITE}/pkg/__pycache__/mod.cpython-311.pyc") == ModuleFile(f"{SITE}/pkg", "mod", "cpython-311", "3.11")
    assert module_file(f"{STDLIB}/json/decoder.py") == ModuleFile(f"{STDLIB}/json", "decoder", "", "3.11")
    assert module_file(f"{SITE}/pkg/__init__.py") == ModuleFile(f"{SITE}/pkg", "__init__", "", "")
    assert module_file("usr/lib/libc.so.6") is None
    assert module_file("pkg/mod.cpython-311.pyc") is None  # bytecode outside __pycache__ is not a cached module


class _Layer:
    def __init__(self, names):
        self.toc = build_toc([{"name": n, "type": "dir" if n.endswith("/") else "reg"} for n in names], data_end=10**9)


def test_modules_are_found_where_python_finds_them():
    lower = _Layer([f"{STDLIB}/", f"{STDLIB}/json/", f"{STDLIB}/json/__init__.py", f"{STDLIB}/json/__pycache__/",
                    f"{STDLIB}/json/__pycache__/__init__.cpython-311.pyc", f"{STDLIB}/json/decoder.py",
                    f"{STDLIB}/shlex.py", f"{STDLIB}/__pycache__/", f"{STDLIB}/__pycache__/shlex.cpython-311.pyc",
                    f"{STDLIB}/os.py", f"{STDLIB}/__pycache__/os.cpython-311.pyc"])
    upper = _Layer([f"{SITE}/", f"{SITE}/pkg/", f"{SITE}/pkg/__init__.py", f"{SITE}/pkg/sub/",
                    f"{SITE}/pkg/sub/__init__.py", f"{SITE}/pkg/sub/leaf.py", f"{SITE}/pkg/sibling.py",
                    f"{SITE}/nspace/", f"{SITE}/nspace/mod.py", f"{SITE}/json/"])  # (not a package: json stays stdlib's)
    finder = ModuleFinder([upper, lower])
    where = ModuleFile(f"{SITE}/pkg", "__init__", "", "")  # no version in the path: usr/lib/python3.11 says it
    imports = [Import("os", 0, ()), Import("shlex", 0, ()), Import("json", 0, ("decoder", "not_a_module")), Import("", 1, ("sibling",)),
               Import("sub.leaf", 1, ()), Import("nspace.mod", 0, ()), Import("missing", 0, ()), Import("sys", 0, ())]
    found = [(layer is upper, entry.name) for layer, entry in finder.files_imported_by(where, imports)]
    assert found == [
        (False, f"{STDLIB}/__pycache__/shlex.cpython-311.pyc"),  # the bytecode, not the source; not os: frozen
        (False, f"{STDLIB}/json/__pycache__/__init__.cpython-311.pyc"), (False, f"{STDLIB}/json/decoder.py"),
        (True, f"{SITE}/pkg/sibling.py"),
        (True, f"{SITE}/pkg/sub/__init__.py"), (True, f"{SITE}/pkg/sub/leaf.py"),
        (True, f"{SITE}/nspace/mod.py"),  # through a namespace package
    ]


@pytest.mark.skipif(importlib.util.MAGIC_NUMBER != PYC_MAGIC_311, reason="bytecode of CPython 3.11 only")
def test_reading_a_module_fetches_what_it_imports_and_theirs_before_python_asks(tmp_path, open_layer):
    sources = {
        f"{SITE}/app/__init__.py": "from . import models\nimport app.views\n\ndef later():\n    import app.unused\n",
        f"{SITE}/app/models.py": "import json\nfrom .db import connect\n",
        f"{SITE}/app/views.py": "x = 1\n",
        f"{SITE}/app/db.py": "try:\n    import optional_driver\nexcept ImportError:\n    pass\n",
        f"{SITE}/app/unused.py": "y = 2\n" * 100,
        f"{SITE}/app/other.py": "z = 3\n" * 100,
    }
    stdlib = {f"{STDLIB}/json/__pycache__/__init__.cpython-311.pyc": _pyc("from .decoder import JSONDecoder\n"),
              f"{STDLIB}/json/__pycache__/decoder.cpython-311.pyc": _pyc("import re\n"),
              f"{STDLIB}/json/__init__.py": b"", f"{STDLIB}/json/decoder.py": b""}
    dirs = lambda names: [tar_member(d, tarfile.DIRTYPE, mode=0o755)  # noqa: E731
                          for d in sorted({"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)})]
    data = {name: text.encode() for name, text in sources.items()}
    lower = layer_of(tmp_path / "lower", dirs(stdlib) + [tar_member(n, size=len(b)) for n, b in stdlib.items()], stdlib)
    upper = layer_of(tmp_path / "upper", dirs(data) + [tar_member(n, size=len(b)) for n, b in data.items()], data)
    config = lazy_config(import_readahead=True)  # the policy alone: no neighbours
    worker = ImportReadahead()
    bottom, bottom_src = open_layer(lower, config=config, import_worker=worker)
    top, top_src = open_layer(upper, config=config, import_worker=worker)
    try:
        for layer in (top, bottom):
            layer.attach_image(lambda: [top, bottom])
        top_src.reset_counters()
        bottom_src.reset_counters()
        init = top.toc.lookup(f"{SITE}/app/__init__.py")
        assert top.read(init, 0, init.size) == data[f"{SITE}/app/__init__.py"]  # Python imports `app`
        wait_until(lambda: worker.modules >= 5)  # app, models, views, db, json, json.decoder: looked at in turn
        assert top.drain(30) and bottom.drain(30)
        cached = lambda layer, name: all(layer.reader.cache.contains(c.digest)  # noqa: E731
                                         for c in layer.toc.lookup(name).chunks)
        for name in ("app/models.py", "app/views.py", "app/db.py"):
            assert cached(top, f"{SITE}/{name}"), name
        for name in ("json/__pycache__/__init__.cpython-311.pyc", "json/__pycache__/decoder.cpython-311.pyc"):
            assert cached(bottom, f"{STDLIB}/{name}"), name
        assert not cached(top, f"{SITE}/app/unused.py")  # imported in a function: may never run
        assert not cached(top, f"{SITE}/app/other.py")  # imported by nobody
        db = top.toc.lookup(f"{SITE}/app/db.py")
        assert not any(c.digest in top.reader.cache.memory for c in db.chunks)  # the worker's look kept nothing hot
        calls = top_src.calls, bottom_src.calls
        for name, layer in ((f"{SITE}/app/db.py", top), (f"{STDLIB}/json/__pycache__/decoder.cpython-311.pyc", bottom)):
            entry = layer.toc.lookup(name)
            layer.read(entry, 0, entry.size)
        assert (top_src.calls, bottom_src.calls) == calls  # Python's own reads find them cached
        assert top.stats()["modules_read"] == 1  # the app's own first read; the rest the worker read
        assert top.stats()["import_chunks"] >= 3 and bottom.stats()["import_chunks"] == 2
        assert top.stats()["neighbour_chunks"] == 0
    finally:
        worker.close()


def test_an_optimized_image_gets_none(tmp_path, open_layer):
    """Prioritized files are the record of the start, prefetched: import readahead stays out."""
    from stargz_store.cache import ChunkCache

    from .helpers import build_layer

    files = {"app/main.py": b"import app.lib\n", "app/__init__.py": b"", "app/lib.py": b"x = 1\n" * 1000,
             "etc/motd": b"hi\n"}
    built = build_layer(tmp_path / "l", files, prioritized=("etc/motd",))
    for policies, fetched in ((("import_readahead",), True), (("import_readahead", "prefetch"), False)):
        worker = ImportReadahead()
        layer, _ = open_layer(built, config=LayerConfig().with_policies(*policies, fetch_timeout=10.0),
                              import_worker=worker, cache_=ChunkCache(tmp_path / "-".join(policies)))
        try:
            main = layer.toc.lookup("app/main.py")
            layer.read(main, 0, main.size)
            worker.close()
            worker._thread.join(10)  # the worker has looked at what was queued before close
            assert layer.drain(30)
            assert (layer.stats()["import_chunks"] > 0) is fetched, policies
        finally:
            worker.close()


def test_reading_a_script_fetches_what_it_requires_and_theirs(tmp_path, open_layer):
    """Node.js: relative files with their extension guessed, a package from the global folder
    through its package.json's main, core modules and missing ones left alone."""
    share = "usr/share/nodejs"
    files = {
        "app/main.js": b"const e = require('express');\nconst u = require('./util');\nconst fs = require('fs');\n"
                       b"require('not-installed');\n",
        "app/util.js": b"module.exports = 1;\n",
        "app/unused.js": b"//" + random.Random(3).randbytes(20_000).hex().encode(),  # (over the gap requests span)
        f"{share}/express/package.json": b'{"name": "express", "main": "lib/express.js"}',
        f"{share}/express/lib/express.js": b"const r = require('./router');\nmodule.exports = r;\n",
        f"{share}/express/lib/router/index.js": b"module.exports = function router() {};\n",
        f"{share}/express/index.js": b"module.exports = require('./lib/express');\n" * 50,  # main says otherwise
    }
    from .helpers import build_layer

    built = build_layer(tmp_path / "l", files)
    worker = ImportReadahead()
    layer, src = open_layer(built, config=lazy_config(import_readahead=True), import_worker=worker)
    try:
        main = layer.toc.lookup("app/main.js")
        assert layer.read(main, 0, main.size) == files["app/main.js"]
        cached = lambda name: all(layer.reader.cache.contains(c.digest) for c in layer.toc.lookup(name).chunks)  # noqa: E731
        wait_until(lambda: cached(f"{share}/express/lib/router/index.js"))  # three files down the chain
        assert worker.modules == 3  # main.js, package.json, lib/express.js named something
        assert layer.drain(30)
        for name in ("app/util.js", f"{share}/express/package.json", f"{share}/express/lib/express.js",
                     f"{share}/express/lib/router/index.js"):
            assert cached(name), name
        assert not cached("app/unused.js") and not cached(f"{share}/express/index.js")
        calls = src.calls
        router = layer.toc.lookup(f"{share}/express/lib/router/index.js")
        layer.read(router, 0, router.size)
        assert src.calls == calls  # Node's own read finds it cached
    finally:
        worker.close()


def test_reading_a_source_fetches_the_headers_it_includes_and_theirs(tmp_path, open_layer):
    """GCC's order: a quoted include beside the file first; the C++ library's directories, then
    the system ones, of the image's GCC; a header not in the image, or never included, not fetched."""
    cxx, triple = "usr/include/c++/12", "usr/include/x86_64-linux-gnu"
    files = {
        "src/app/main.cpp": b'#include <iostream>\n#include "app.h"\n#include <not_installed.h>\nint main() {}\n',
        "src/app/app.h": b"#pragma once\n#include <string.h>\n",
        "src/app/unused.h": b"//" + random.Random(4).randbytes(20_000).hex().encode(),
        f"{cxx}/iostream": b"#include <bits/c++config.h>\n#include <ostream>\n",
        f"{cxx}/ostream": b"// ostream\n",
        f"{cxx}/string.h": b"// the C++ library's wrapper, first on a C++ compile's path\n",
        f"{triple}/c++/12/bits/c++config.h": b"#define _GLIBCXX 1\n",
        "usr/lib/gcc/x86_64-linux-gnu/12/include/stddef.h": b"// gcc's\n",
        "usr/include/unused.h": b"//" + random.Random(5).randbytes(20_000).hex().encode(),
    }
    from .helpers import build_layer

    built = build_layer(tmp_path / "l", files)
    worker = ImportReadahead()
    layer, _ = open_layer(built, config=lazy_config(import_readahead=True), import_worker=worker)
    try:
        main = layer.toc.lookup("src/app/main.cpp")
        layer.read(main, 0, main.size)
        cached = lambda name: all(layer.reader.cache.contains(c.digest) for c in layer.toc.lookup(name).chunks)  # noqa: E731
        wait_until(lambda: cached(f"{triple}/c++/12/bits/c++config.h") and cached(f"{cxx}/ostream"))
        assert layer.drain(30)
        assert cached("src/app/app.h") and cached(f"{cxx}/iostream")
        assert cached(f"{cxx}/string.h")  # app.h is C++ (a .h, but included by a .cpp: GCC's C++ search)
        assert not cached("src/app/unused.h") and not cached("usr/include/unused.h")
    finally:
        worker.close()
