"""The startup corpus: what each benchmark image holds, what its workload does, and which group it is in.

HelloBench's idea (many kinds of containers, each timed to its first useful output) with images
built from Debian packages. The "tuning" images are the three the fetch heuristics were designed
and measured on; every other one is "held-out": a change to the fetch policy is judged on those.
Workload sources longer than a line live in workloads/<name>/ and are copied into the image.
"""
from __future__ import annotations

import os
import random
import shutil
import zipfile
from pathlib import Path

from . import rootfs
from .images import IMAGE_PATH, Hook, ImageRecipe, LayerStep

BUSYBOX_APPLETS = ("sh", "cat", "ls", "echo", "env", "mkdir", "rm", "sleep")

HELLO_C = b'#include <stdio.h>\nint main(void) { printf("hello, world\\n"); return 0; }\n'
PYTHON_WORKLOAD = (
    "import json, sqlite3, decimal, email.parser, numpy, yaml, requests, jinja2; "
    "print('hello from python', numpy.__version__, flush=True)"
)
FILLER_FILES = 50
FILLER_FILE_SIZE = 10 * 1024 * 1024

# held-out: a different library set, and no bytecode anywhere (Python compiles every module at import)
PYNOPYC_WORKLOAD = (
    "import argparse, asyncio, email.mime.multipart, http.client, xml.dom.minidom, sqlite3; "
    "import docutils.core, pygments.lexers, pygments.formatters, markdown, bs4, html5lib, rich.console, click; "
    "html = markdown.markdown('# Lazy pulling\\n\\n*stargz*'); "
    "soup = bs4.BeautifulSoup(html, 'html5lib'); "
    "code = pygments.highlight('print(1)', pygments.lexers.PythonLexer(), pygments.formatters.HtmlFormatter()); "
    "print('hello from pynopyc', soup.h1.text, len(code), flush=True)"
)
# held-out: byte-compiled, a client library that reads large JSON service models, and a graph library
PYAWS_WORKLOAD = (
    "import boto3, networkx; "
    "s3 = boto3.client('s3', region_name='us-east-1', aws_access_key_id='x', aws_secret_access_key='y'); "
    "g = networkx.karate_club_graph(); "
    "print('hello from pyaws', s3.meta.service_model.service_name, len(s3.meta.service_model.operation_names), "
    "'operations', g.number_of_nodes(), 'nodes', flush=True)"
)
JAVA_HOME = "/usr/lib/jvm/java-17-openjdk-amd64"
JAVA_CLASSPATH = ":".join(["/app/hello.jar"] + [f"/usr/share/java/{jar}.jar" for jar in (
    "guava", "jackson-databind", "jackson-core", "jackson-annotations", "commons-lang3", "commons-text")])
MODEL_SEED = 13
MODEL_RANDOM_FILES = ("weights-00.bin", "weights-01.bin")  # read by the workload
MODEL_FILE_SIZE = 16 * 1024 * 1024
MODEL_TEXT_SIZE = 8 * 1024 * 1024  # vocab.txt, read by the workload, compressible
ARCHIVE_FILES = 4  # 16 MiB each, not read


def _skeleton(root: Path) -> None:
    """What base-files and busybox's postinst would provide: directories, users, a shell."""
    for d in ("bin", "dev", "etc", "proc", "root", "sys", "tmp", "usr/bin", "var/tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "var/tmp", 0o1777)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    for applet in BUSYBOX_APPLETS:
        link = root / "bin" / applet
        if not link.exists() and not link.is_symlink():
            link.symlink_to("busybox")


def _blas_alternatives(root: Path) -> None:
    """The libblas.so.3/liblapack.so.3 links update-alternatives would make (numpy needs them)."""
    libdir = root / "usr/lib/x86_64-linux-gnu"
    for sub in ("blas", "lapack"):
        for lib in sorted((libdir / sub).glob("lib*.so.3")):
            link = libdir / lib.name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(f"{sub}/{lib.name}")


def _compile_python(root: Path) -> None:
    """Byte-compile what py3compile would at install time, so the workload does not compile at start."""
    dirs = [d for d in ("usr/lib/python3.11", "usr/lib/python3/dist-packages") if (root / d).is_dir()]
    rootfs.chroot_run(root, ["python3", "-m", "compileall", "-q", "-j", "2", *(f"/{d}" for d in dirs)],
                      {"PATH": IMAGE_PATH}, check=False)


def _hello_source(root: Path) -> None:
    (root / "src").mkdir(exist_ok=True)
    (root / "src/hello.c").write_bytes(HELLO_C)


def _filler(root: Path) -> None:
    """500 MB of random (incompressible) data the workload never reads, then the one small file it does."""
    data = root / "data"
    (data / "filler").mkdir(parents=True, exist_ok=True)
    for i in range(FILLER_FILES):
        with open(data / "filler" / f"part-{i:03d}.bin", "wb") as f:
            for _ in range(FILLER_FILE_SIZE // (1 << 20)):
                f.write(os.urandom(1 << 20))
    (data / "hello.txt").write_text("hello from bigdata\n")


def _compile_java(root: Path) -> None:
    """javac (the headless JRE's own jdk.compiler module) on /app/src, the classes zipped into /app/hello.jar."""
    classes = root / "tmp/classes"
    rootfs.chroot_run(root, [f"{JAVA_HOME}/bin/java", "-m", "jdk.compiler/com.sun.tools.javac.Main",
                             "-cp", JAVA_CLASSPATH, "-d", "/tmp/classes", "/app/src/Hello.java"], {"PATH": IMAGE_PATH})
    with zipfile.ZipFile(root / "app/hello.jar", "w", zipfile.ZIP_DEFLATED) as jar:
        jar.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\r\nMain-Class: Hello\r\n\r\n")
        for path in sorted(classes.rglob("*.class")):
            jar.write(path, str(path.relative_to(classes)))
    shutil.rmtree(classes)
    shutil.rmtree(root / "tmp/hsperfdata_root", ignore_errors=True)  # the compiler JVM's, not the image's


def _model_files(root: Path) -> None:
    """A model directory the workload reads whole (two incompressible weight files, a text vocabulary)
    beside an archive it never reads; seeded, so every build holds the same bytes."""
    rng = random.Random(MODEL_SEED)
    model, archive = root / "data/model", root / "data/archive"
    model.mkdir(parents=True, exist_ok=True)
    archive.mkdir(parents=True, exist_ok=True)
    for i in range(ARCHIVE_FILES):
        (archive / f"checkpoint-{i:02d}.bin").write_bytes(rng.randbytes(MODEL_FILE_SIZE))
    for name in MODEL_RANDOM_FILES:
        (model / name).write_bytes(rng.randbytes(MODEL_FILE_SIZE))
    lines, size, n = [], 0, 0
    while size < MODEL_TEXT_SIZE:
        line = f"{n}\ttoken{rng.randrange(1 << 20)}\t{rng.random():.6f}\n"
        lines.append(line)
        size += len(line)
        n += 1
    (model / "vocab.txt").write_text("".join(lines))


HOOKS: dict[str, Hook] = {
    "skeleton": _skeleton,
    "blas_alternatives": _blas_alternatives,
    "compile_python": _compile_python,
    "hello_source": _hello_source,
    "filler": _filler,
    "compile_java": _compile_java,
    "model_files": _model_files,
}

BASE = LayerStep(("libc6", "busybox-static"), ("skeleton",))
STATIC_BASE = LayerStep(("busybox-static",), ("skeleton",))
PYTHON_ENV_NO_BYTECODE = (f"PATH={IMAGE_PATH}", "PYTHONDONTWRITEBYTECODE=1")

_RECIPES = (
    # ---- tuning set: the fetch heuristics were designed and measured on these ----
    ImageRecipe(
        name="python",
        description="python3.11 + stdlib + numpy, scipy, pandas, sympy, django, ... (imports a few modules)",
        steps=(
            BASE,
            LayerStep(("python3",), ("compile_python",)),
            LayerStep(("python3-numpy", "python3-scipy", "python3-pandas", "python3-sympy", "python3-yaml",
                       "python3-requests", "python3-jinja2", "python3-lxml", "python3-babel", "python3-django",
                       "python3-cryptography", "python3-sqlalchemy", "python3-setuptools"),
                      ("blas_alternatives", "compile_python")),
        ),
        cmd=("python3", "-c", PYTHON_WORKLOAD),
        marker="hello from python",
        group="tuning",
    ),
    ImageRecipe(
        name="toolchain",
        description="gcc 12 + binutils + libc headers (compiles and runs hello world)",
        steps=(BASE, LayerStep(("gcc", "libc6-dev"), ("hello_source",))),
        cmd=("/bin/sh", "-c", "gcc -O2 -o /tmp/hello /src/hello.c && /tmp/hello"),
        marker="hello, world",
        group="tuning",
    ),
    ImageRecipe(
        name="bigdata",
        description="busybox-static + 500 MB incompressible filler (reads one small file)",
        steps=(STATIC_BASE, LayerStep((), ("filler",))),
        cmd=("/bin/cat", "/data/hello.txt"),
        marker="hello from bigdata",
        group="tuning",
    ),
    # ---- held-out: nothing was tuned on these ----
    ImageRecipe(
        name="pynopyc",
        description="python3.11 + docutils, pygments, markdown, bs4, html5lib, rich, click; no .pyc at all "
                    "(imports them, compiling every module)",
        steps=(
            BASE,
            LayerStep(("python3",)),
            LayerStep(("python3-docutils", "python3-pygments", "python3-markdown", "python3-bs4", "python3-html5lib",
                       "python3-rich", "python3-click")),
        ),
        cmd=("python3", "-c", PYNOPYC_WORKLOAD),
        marker="hello from pynopyc",
        env=PYTHON_ENV_NO_BYTECODE,
    ),
    ImageRecipe(
        name="pyaws",
        description="python3.11 + boto3/botocore (JSON service models), networkx; byte-compiled "
                    "(creates an S3 client, builds a graph)",
        steps=(
            BASE,
            LayerStep(("python3",), ("compile_python",)),
            LayerStep(("python3-boto3", "python3-networkx"), ("compile_python",)),
        ),
        cmd=("python3", "-c", PYAWS_WORKLOAD),
        marker="hello from pyaws",
    ),
    ImageRecipe(
        name="java",
        description="OpenJDK 17 headless JRE + guava, jackson, commons-lang3/text jars "
                    "(a class that uses all of them prints JSON)",
        steps=(
            BASE,
            LayerStep(("openjdk-17-jre-headless",)),
            LayerStep(("libguava-java", "libjackson2-databind-java", "libcommons-lang3-java", "libcommons-text-java"),
                      ("compile_java",), files=(("java", "/app/src"),)),
        ),
        cmd=(f"{JAVA_HOME}/bin/java", "-cp", JAVA_CLASSPATH, "Hello"),
        marker="hello from java",
    ),
    ImageRecipe(
        name="node",
        description="Node.js 18 + express, lodash, yargs, semver, debug, uuid from node-* packages "
                    "(requires them, builds an app)",
        steps=(
            BASE,
            LayerStep(("nodejs",)),
            LayerStep(("node-express", "node-lodash", "node-yargs", "node-semver", "node-debug", "node-uuid"),
                      files=(("node", "/app"),)),
        ),
        cmd=("node", "/app/main.js"),
        marker="hello from node",
    ),
    ImageRecipe(
        name="cxx",
        description="g++ 12 + make + boost headers; a three-file C++ project (make -j2, then runs it)",
        steps=(
            BASE,
            LayerStep(("g++", "make")),
            LayerStep(("libboost-dev",), files=(("cxx", "/src/app"),)),
        ),
        cmd=("/bin/sh", "-c", "make -s --no-print-directory -j2 -C /src/app OUT=/tmp && /tmp/app"),
        marker="hello from cxx",
    ),
    ImageRecipe(
        name="shell",
        description="dash + coreutils, grep, sed, gawk, findutils, a word list (pipelines over it)",
        steps=(
            BASE,
            LayerStep(("dash", "coreutils", "grep", "sed", "gawk", "findutils", "wamerican"),
                      files=(("shell", "/app"),)),
        ),
        cmd=("/bin/dash", "/app/pipeline.sh"),
        marker="hello from shell",
    ),
    ImageRecipe(
        name="server",
        description="busybox-static (a statically linked httpd) + the Python 3.11 HTML docs as the site "
                    "(serves one page over loopback)",
        steps=(STATIC_BASE, LayerStep(("python3.11-doc",), files=(("server", "/app"),))),
        cmd=("/bin/sh", "/app/serve-one.sh"),
        marker="hello from server",
    ),
    ImageRecipe(
        name="dataread",
        description="busybox-static + a 40 MB model directory read whole beside a 64 MB archive not read",
        steps=(STATIC_BASE, LayerStep((), ("model_files",))),
        cmd=("/bin/sh", "-c", "s=$(cat /data/model/weights-00.bin /data/model/weights-01.bin "
                              "/data/model/vocab.txt | busybox md5sum) && echo \"hello from dataread ${s%% *}\""),
        marker="hello from dataread",
    ),
)

RECIPES: dict[str, ImageRecipe] = {r.name: r for r in _RECIPES}
TUNING = tuple(r.name for r in _RECIPES if r.group == "tuning")
HELD_OUT = tuple(r.name for r in _RECIPES if r.group == "held-out")
