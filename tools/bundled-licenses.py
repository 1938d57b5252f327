#!/usr/bin/env python3
"""Licences of the vendored crates and of what is statically linked into pingora-lb, from Cargo.lock.

Writes
  * debian/copyright (machine-readable DEP-5), which describes the files of the
    SOURCE package: the header and the project's own `Files:` paragraphs are
    kept as they are in the current file; after them one
    `Files: vendor/<name>-<version>/*` paragraph for EVERY crate of Cargo.lock
    (the directory `cargo vendor --versioned-dirs` gives it, which is how
    tools/source-tarball.sh --vendor ships them), each followed by paragraphs
    for the code of other origin in that crate's sources (SYS_CRATES), then
    one stand-alone `License:` paragraph per licence short name used anywhere
    in the file. The paragraphs of crates that are not linked into the binary
    carry a `Comment:` saying why they are there (build scripts, proc-macros,
    tests, other platforms);
  * the `License:` tag of rpm/pingora-lb.spec: an SPDX expression, the
    project's own licence first, then every distinct licence expression of the
    code statically linked into the binary, sorted, joined with AND (Fedora
    style). Only the binary's: Fedora's License tag is the licence of what the
    binary RPM contains, not of the source RPM (whose vendored crates that are
    used only to build are described in debian/copyright alone).

Usage
  python3 tools/bundled-licenses.py           regenerate both files
  python3 tools/bundled-licenses.py --check   exit 1 with a diff if either file
                                              differs from what would be written
  python3 tools/bundled-licenses.py --list    print crate, version, licence
                                              (and why, if not in the binary)

Which crates are vendored
  All the packages of Cargo.lock that come from a registry: `cargo metadata
  --locked --format-version 1` without --filter-platform (cargo vendor, too,
  copies the crates of every platform). The run fails unless that set equals
  the lock file's packages; a path dependency (not copied by cargo vendor)
  fails it too.

Which crates count as bundled (statically linked into the binary)
  The dependency graph is the one the release build uses, for both Linux targets
  the packages are built for (x86_64 and aarch64; today both give the same set,
  the union is taken so that one debian/copyright fits both architectures):
  * cargo metadata (above) gives each package's licence, licence file, authors
    and source directory;
  * `cargo tree --locked -e normal --target <target>` gives the edges. cargo
    metadata's `resolve` is not enough on its own: it is the lock file's
    resolve, which keeps optional dependencies named only in weak `dep?/feature`
    features (rust-lang/cargo#10801), so it has time -> time-macros, which is
    not built here. cargo tree runs the real feature resolver for the target.
  From the root, only normal dependencies are followed: build-dependencies and
  dev-dependencies are not in the binary.
  Proc-macro crates count: their expansions are compiled into the binary (the
  code that serde_derive or thiserror-impl generates is theirs). Their own
  dependencies (syn, quote, proc-macro2, heck, ...) do not: like build scripts,
  they run inside the compiler on the build host and are linked into the
  proc-macro's shared object, not into pingora-lb; the walk stops at a
  proc-macro. (Set FOLLOW_PROC_MACRO_DEPENDENCIES to True to list them too.)
  The Rust standard library, which rustc links into every binary, is part of
  the toolchain and is not listed, as Debian and Fedora do for Rust packages.
  Every other vendored crate gets a Comment with the first of these that
  applies (cargo tree again, for the Linux targets unless said otherwise):
  a dependency of proc-macros only (`-e normal`), of build scripts
  (`-e normal,build`), of the tests and benchmarks (`-e normal,build,dev`), of
  other platforms (`-e normal,build,dev --target all`), or not built at all
  (in Cargo.lock only: an optional dependency no enabled feature turns on).

Code of other origin in crates' sources (SYS_CRATES)
  Every vendored crate with a `links` key, or whose name ends in -sys or -src
  (the usual names of crates that build or bundle a native library), must
  appear in SYS_CRATES, which says, read from the crate's sources (each entry
  cites the files):
  * "c": the C code it compiles into the binary and under which licence that
    code is; its licence goes into the spec's License too;
  * "source": third-party code shipped in its sources but not compiled into
    the binary (debian/copyright only);
  * "system": what it links dynamically instead;
  * "none": why there is nothing to describe (bindings only, ...).
  Other crates may appear there for their "source" too. A new such crate fails
  the run until it is described there. The copyright holders of a "c" or
  "source" paragraph are read either from the files the entry names ("Copyright
  ..." lines), or, for HEADERS, from the copyright lines near the top of every
  file of the directory (licence texts and subdirectories with their own
  paragraph left out), merged per holder over the years; or, for AUTHORS, they
  are the crate's authors.

Licences
  A crate's `license` field is parsed as an SPDX expression (the obsolete "/"
  separator is read as OR). Every licence identifier must be in LICENSES, which
  gives the text of its stand-alone paragraph in debian/copyright: either a
  pointer to /usr/share/common-licenses or the text of one representative
  licence file from a vendored crate's own sources in the cargo registry (title
  and copyright lines dropped: the holders are in each Files paragraph). An
  exception ("<licence> WITH <exception>") must be in EXCEPTIONS, which gives
  its DEP-5 keyword: DEP-5 writes it "<licence> with <keyword> exception", and
  the whole is one short name with its own stand-alone paragraph in LICENSES
  (the licence's text, then the exception's). An unknown identifier or
  exception, or a crate with only a `license-file`, stops the run with a
  message saying what to add.

The output depends only on Cargo.lock, the crates' sources and this script:
everything is sorted, so two runs give the same bytes.

Python 3.11 or later (tomllib), standard library only; needs cargo on PATH
and the crates' sources (cargo metadata downloads them, for every platform).
"""

import argparse
import difflib
import functools
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPYRIGHT = REPO / "debian" / "copyright"
SPEC = REPO / "rpm" / "pingora-lb.spec"
CARGO_CONFIG = REPO / ".cargo" / "config.toml"
CARGO_LOCK = REPO / "Cargo.lock"
RPMLINTRC = REPO / "rpm" / "pingora-lb.rpmlintrc"

# The Linux targets the packages are built for.
TARGETS = ("x86_64-unknown-linux-gnu", "aarch64-unknown-linux-gnu")

FOLLOW_PROC_MACRO_DEPENDENCIES = False

SPEC_COMMENT = ("# License: generated by tools/bundled-licenses.py from Cargo.lock "
                "(this package, then what is statically linked in); do not edit by hand.")

# License short name -> how its stand-alone paragraph in debian/copyright gets
# its text:
#   ("common", path)          a pointer to the copy in /usr/share/common-licenses
#   ("file", crate, path, first_line_prefix)
#                             the text of `path` in that crate's sources (the
#                             version in the build graph), from the first line
#                             that starts with first_line_prefix (None: from the
#                             top), so that title and copyright lines are left out.
#   ("exception", crate, path, first_line_prefix)
#                             for "<licence> WITH <exception>": the licence's
#                             own paragraph text, then the exception's text
#                             taken from that crate's file as above.
# The crate must be one of the vendored crates, so that the text is one that
# actually applies to shipped code. An identifier that reaches the spec's
# License tag also needs to be in the invalid-license filter of
# rpm/pingora-lb.rpmlintrc (for an exception: the licence there, the exception
# in an invalid-license-exception filter), which --check makes sure of.
LICENSES = {
    "Apache-2.0": ("common", "Apache-2.0"),
    "Apache-2.0 WITH LLVM-exception": ("exception", "rustix",
                                       "LICENSE-Apache-2.0_WITH_LLVM-exception",
                                       "--- LLVM Exceptions to the Apache 2.0 License"),
    "Artistic-1.0-Perl": ("common", "Artistic"),
    "BSD-2-Clause": ("file", "zstd-sys", "LICENSE.BSD-2-Clause", "Redistribution and use"),
    "BSD-3-Clause": ("file", "subtle", "LICENSE", "Redistribution and use"),
    "BSL-1.0": ("file", "ryu", "LICENSE-BOOST", None),
    "CC0-1.0": ("common", "CC0-1.0"),
    "GPL-1.0-or-later": ("common", "GPL-1"),
    "GPL-2.0-only": ("common", "GPL-2"),
    "GPL-2.0-or-later": ("common", "GPL-2"),
    "LGPL-2.1-or-later": ("common", "LGPL-2.1"),
    "MIT": ("file", "tokio", "LICENSE", "Permission is hereby granted"),
    "Unicode-3.0": ("file", "unicode-ident", "LICENSE-UNICODE", None),
    "Unlicense": ("file", "memchr", "UNLICENSE", None),
    "Zlib": ("file", "foldhash", "LICENSE", "This software is provided"),
}

# Wording of the pointer paragraphs ("common" above). The Apache-2.0 one keeps
# the notice this file had when it was written by hand.
COMMON_LICENSE_NOTICES = {
    "Apache-2.0": """\
Licensed under the Apache License, Version 2.0 (the "License");
you may not use this file except in compliance with the License.
You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS,
WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and
limitations under the License.

On Debian systems, the complete text of the Apache License, Version 2.0
can be found in "/usr/share/common-licenses/Apache-2.0".
""",
    "Artistic-1.0-Perl": """\
This program is free software; you can redistribute it and/or modify
it under the terms of the Artistic License, which comes with Perl.

On Debian systems, the complete text of the Artistic License can be
found in "/usr/share/common-licenses/Artistic".
""",
    "CC0-1.0": """\
On Debian systems, the complete text of the Creative Commons CC0 1.0
Universal public domain dedication can be found in
"/usr/share/common-licenses/CC0-1.0".
""",
    "GPL-1.0-or-later": """\
This program is free software; you can redistribute it and/or modify
it under the terms of the GNU General Public License as published by
the Free Software Foundation; either version 1, or (at your option)
any later version.

This program is distributed in the hope that it will be useful,
but WITHOUT ANY WARRANTY; without even the implied warranty of
MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the
GNU General Public License for more details.

On Debian systems, the complete text of the GNU General Public License
version 1 can be found in "/usr/share/common-licenses/GPL-1".
""",
    "GPL-2.0-only": """\
This program is free software; you can redistribute it and/or modify
it under the terms of the GNU General Public License version 2 as
published by the Free Software Foundation.

This program is distributed in the hope that it will be useful,
but WITHOUT ANY WARRANTY; without even the implied warranty of
MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the
GNU General Public License for more details.

On Debian systems, the complete text of the GNU General Public License
version 2 can be found in "/usr/share/common-licenses/GPL-2".
""",
    "GPL-2.0-or-later": """\
This program is free software; you can redistribute it and/or modify
it under the terms of the GNU General Public License as published by
the Free Software Foundation; either version 2 of the License, or
(at your option) any later version.

This program is distributed in the hope that it will be useful,
but WITHOUT ANY WARRANTY; without even the implied warranty of
MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the
GNU General Public License for more details.

On Debian systems, the complete text of the GNU General Public License
version 2 can be found in "/usr/share/common-licenses/GPL-2".
""",
    "LGPL-2.1-or-later": """\
This library is free software; you can redistribute it and/or
modify it under the terms of the GNU Lesser General Public
License as published by the Free Software Foundation; either
version 2.1 of the License, or (at your option) any later version.

This library is distributed in the hope that it will be useful,
but WITHOUT ANY WARRANTY; without even the implied warranty of
MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the GNU
Lesser General Public License for more details.

On Debian systems, the complete text of the GNU Lesser General Public
License version 2.1 can be found in "/usr/share/common-licenses/LGPL-2.1".
""",
}

# SPDX licence exceptions -> the keyword of DEP-5's "<licence> with <keyword>
# exception". Debian writes the LLVM one "Apache-2.0 with LLVM exception"
# (the rustc and llvm-toolchain packages' debian/copyright); lintian accepts
# "<name> with <word> exception" (bad-exception-format-in-dep5-copyright).
EXCEPTIONS = {
    "LLVM-exception": "LLVM",
}

# Crates that declare only `license-file`: name -> the SPDX expression their
# licence file amounts to, decided by reading it. Identifiers
# "LicenseRef-<name>" take their stand-alone text from that file. Empty today.
LICENSE_FILE_CRATES = {}

# Where a "c" or "source" entry takes its copyright holders from, instead of a
# list of files: HEADERS, the "Copyright ..." lines in the first HEADER_LINES
# lines of every file of its directory (except licence texts and the
# directories of later entries of the crate), merged per holder; AUTHORS, the
# crate's `authors`.
HEADERS = "headers"
AUTHORS = "authors"
HEADER_LINES = 40

# Every vendored crate with a `links` key or a name ending in -sys or -src,
# i.e. one that may build, bundle or link a native library, and any other crate
# whose sources hold code of other origin or under other terms than its own:
#   "c": the C code it compiles into the binary, as (directory inside the crate,
#        SPDX expression of that code, files its copyright lines are read from
#        (or HEADERS or AUTHORS), where the licence is stated); each becomes a
#        Files paragraph after the crate's own, and its licence goes into the
#        spec's License too, where it differs from the crate's.
#   "source": code in its sources that is NOT compiled into the binary, as
#        (directory, SPDX expression, holders as for "c", where the licence is
#        stated, comment): a Files paragraph with that Comment, in
#        debian/copyright only. Entries of a crate are written in table order
#        ("c" first): a subdirectory of another entry's must come after it.
#   "system": what it links dynamically instead; nothing of it is bundled.
#   "none": why there is nothing to describe.
SYS_CRATES = {
    # mimalloc 2.x (and 3.x, selected by the `v3` feature; not enabled), MIT:
    # c_src/mimalloc/v2/LICENSE and c_src/mimalloc/v3/LICENSE. Same licence as
    # the crate, other copyright holders (Microsoft Corporation, Daan Leijen).
    "libmimalloc-sys": {"c": [
        ("c_src/mimalloc", "MIT",
         ["c_src/mimalloc/v2/LICENSE", "c_src/mimalloc/v3/LICENSE"],
         "c_src/mimalloc/v2/LICENSE, c_src/mimalloc/v3/LICENSE"),
    ]},
    # zlib-ng, built by zng/cmake.rs as a static library, is under the zlib
    # licence (src/zlib-ng/LICENSE.md), not the crate's "MIT OR Apache-2.0".
    "libz-ng-sys": {"c": [
        ("src/zlib-ng", "Zlib", ["src/zlib-ng/LICENSE.md"], "src/zlib-ng/LICENSE.md"),
    ]},
    # Zstandard: every source file says it is "licensed under both the
    # BSD-style license (found in the LICENSE file ...) and the GPLv2 (found in
    # the COPYING file ...). You may select, at your option, one of the
    # above-listed licenses." (zstd/LICENSE, zstd/COPYING). The crate's field,
    # "BSD-3-Clause AND BSD-2-Clause", takes the BSD option and adds, per
    # LICENSE.BSD-2-Clause, BSD-2-Clause for the legacy-format decoders in
    # zstd/lib/legacy/ (compiled: the `legacy` feature is on by default).
    "zstd-sys": {"c": [
        ("zstd", "BSD-3-Clause OR GPL-2.0-only", ["zstd/LICENSE"], "zstd/LICENSE, zstd/COPYING"),
        ("zstd/lib/legacy", "(BSD-3-Clause OR GPL-2.0-only) AND BSD-2-Clause",
         ["zstd/LICENSE", "LICENSE.BSD-2-Clause"], "LICENSE.BSD-2-Clause"),
    ]},
    # pingora-openssl turns on the `vendored` feature (OpenSSL built from the
    # openssl-src crate and linked statically), but .cargo/config.toml sets
    # OPENSSL_NO_VENDOR=1 (so does flake.nix), which openssl-sys's
    # build/main.rs honours: libssl.so.3 and libcrypto.so.3 are linked
    # dynamically. check_openssl() enforces that.
    "openssl-sys": {"system": "OpenSSL (libssl, libcrypto), linked dynamically"},
    # OpenSSL's sources, which openssl-sys builds with the `vendored` feature
    # unless OPENSSL_NO_VENDOR is set (see openssl-sys above): openssl-src is a
    # build-dependency of openssl-sys, but its openssl/ is not compiled.
    # OpenSSL 3 is under Apache-2.0 (openssl/LICENSE.txt; every source file's
    # header: "Licensed under the Apache License 2.0"), except the Perl module
    # Text::Template that its Configure uses, bundled in
    # openssl/external/perl/Text-Template-1.56 (its LICENSE: "the same terms as
    # the Perl 5 programming language system itself": GPL-1.0-or-later or the
    # Artistic License); Debian's openssl package describes the two the same way.
    "openssl-src": {"source": [
        ("openssl", "Apache-2.0", HEADERS, "openssl/LICENSE.txt",
         "OpenSSL's sources, for openssl-sys's `vendored` feature. Not built: "
         ".cargo/config.toml sets OPENSSL_NO_VENDOR=1, so openssl-sys links the "
         "system's libssl and libcrypto dynamically."),
        ("openssl/external/perl/Text-Template-1.56", "Artistic-1.0-Perl OR GPL-1.0-or-later",
         HEADERS, "openssl/external/perl/Text-Template-1.56/LICENSE",
         "Perl module used by OpenSSL's Configure script; not built (see above)."),
    ]},
    # A Linux kernel module that nix's tests build (test/test_kmod/hello_mod/
    # hello.c: "SPDX-License-Identifier: GPL-2.0+ or MIT"; no copyright line).
    "nix": {"source": [
        ("test/test_kmod/hello_mod", "GPL-2.0-or-later OR MIT", AUTHORS,
         "test/test_kmod/hello_mod/hello.c",
         "A kernel module for nix's own tests; not built."),
    ]},
    # Build-only crates (not linked into the binary) named -sys, and one with a
    # `links` key; none has C sources of its own or bundles any.
    # bindgen-generated Rust declarations of the Linux UAPI (README.md,
    # src/*/*.rs: "automatically generated by rust-bindgen").
    "linux-raw-sys": {"none": "Rust bindings to the Linux system-call interface only"},
    # Rust declarations of macOS's CoreFoundation (src/*.rs).
    "core-foundation-sys": {"none": "Rust bindings to macOS's CoreFoundation only"},
    # Rust declarations of JavaScript's built-ins (src/lib.rs), plus its own
    # src/futures/task/worker.js.
    "js-sys": {"none": "Rust bindings to JavaScript's built-in objects only"},
    # Rust declarations of the Win32 API (src/Windows/).
    "windows-sys": {"none": "Rust bindings to the Windows API only"},
    # Cargo.toml: "pretend we link a native library" so that only one
    # wasm-bindgen version can be in a graph; build.rs only sets variables.
    "wasm-bindgen-shared": {"none": "the `links` key only keeps one version in a build"},
}


def fail(message):
    sys.exit(f"bundled-licenses: {message}")


def run(args):
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"{' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


# ---------------------------------------------------------------- SPDX parsing
# An expression is ("id", name) or (op, [operands]) with op "AND" or "OR". A
# licence with an exception is one name: ("id", "Apache-2.0 WITH LLVM-exception").

def parse_spdx(text, where):
    tokens = re.findall(r"\(|\)|[^\s()]+", text.replace("/", " OR "))
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1] if pos <= len(tokens) else None

    def expr(op):  # op: "OR" (lowest precedence) or "AND"
        operands = [expr("AND") if op == "OR" else atom()]
        while peek() is not None and peek().upper() == op:
            take()
            operands.append(expr("AND") if op == "OR" else atom())
        return operands[0] if len(operands) == 1 else (op, operands)

    def atom():
        token = take()
        if token == "(":
            inner = expr("OR")
            if take() != ")":
                fail(f"{where}: unbalanced parentheses in {text!r}")
            return inner
        if token is None or token == ")" or token.upper() in ("AND", "OR", "WITH"):
            fail(f"{where}: cannot parse licence expression {text!r}")
        if peek() is not None and peek().upper() == "WITH":
            take()
            exception = take()
            if exception is None or exception in ("(", ")") or \
                    exception.upper() in ("AND", "OR", "WITH"):
                fail(f"{where}: cannot parse licence expression {text!r}")
            if exception not in EXCEPTIONS:
                fail(f"{where}: unknown licence exception {exception!r} in {text!r}: check "
                     "that it is acceptable, then add it to EXCEPTIONS and "
                     f"\"{token} WITH {exception}\" to LICENSES")
            return ("id", f"{token} WITH {exception}")
        return ("id", token)

    tree = expr("OR")
    if pos != len(tokens):
        fail(f"{where}: cannot parse licence expression {text!r}")
    return flatten(tree)


def flatten(tree):
    """Merge nested operators of the same kind: A OR (B OR C) -> A OR B OR C."""
    if tree[0] == "id":
        return tree
    operands = []
    for operand in map(flatten, tree[1]):
        operands.extend(operand[1] if operand[0] == tree[0] else [operand])
    unique = []
    for operand in operands:
        if operand not in unique:
            unique.append(operand)
    return unique[0] if len(unique) == 1 else (tree[0], unique)


def canonical(tree):
    """Operands sorted, so that "MIT OR Apache-2.0" equals "Apache-2.0 OR MIT"."""
    if tree[0] == "id":
        return tree
    operands = sorted({spdx(c): c for c in map(canonical, tree[1])}.items(),
                      key=lambda kv: (kv[0].lower(), kv[0]))
    return (tree[0], [c for _, c in operands])


def ids(tree):
    if tree[0] == "id":
        return {tree[1]}
    return set().union(*map(ids, tree[1]))


def spdx(tree, nested=False):
    if tree[0] == "id":
        return tree[1]
    text = f" {tree[0]} ".join(spdx(c, True) for c in tree[1])
    return f"({text})" if nested else text


def dep5_name(name):
    """A licence short name in DEP-5: "X WITH Y" is "X with <keyword> exception"."""
    if " WITH " in name:
        licence, exception = name.split(" WITH ")
        return f"{licence} with {EXCEPTIONS[exception]} exception"
    return name


def dep5(tree, where):
    """DEP-5 syntax: lower-case operators, no parentheses. "and" binds tighter
    than "or" unless a comma precedes it: "A or B, and C" is (A OR B) AND C."""
    if tree[0] == "id":
        return dep5_name(tree[1])
    op, operands = tree
    if op == "OR":  # operands are ids or ANDs of ids: "A or B and C" is A OR (B AND C)
        for c in operands:
            if c[0] == "AND" and any(g[0] != "id" for g in c[1]):
                fail(f"{where}: licence expression too deep for DEP-5: {spdx(tree)}")
        return " or ".join(" and ".join(dep5_name(g[1]) for g in c[1]) if c[0] == "AND"
                           else dep5_name(c[1]) for c in operands)
    ors = [c for c in operands if c[0] == "OR"]
    if len(ors) > 1 or any(g[0] != "id" for c in ors for g in c[1]):
        fail(f"{where}: licence expression too deep for DEP-5: {spdx(tree)}")
    rest = " and ".join(dep5_name(c[1]) for c in operands if c[0] == "id")
    if not ors:
        return rest
    return " or ".join(dep5_name(g[1]) for g in ors[0][1]) + ", and " + rest


# --------------------------------------------------------- the dependency graph

def version_key(version):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.+-]", version)]


@functools.cache
def cargo_tree(target, kinds="normal"):
    """The feature-resolved dependency graph for target ("all": every
    platform), following the dependency kinds given ("normal", "normal,build",
    ...): {(name, version): set of (name, version)}, and the root."""
    out = run(["cargo", "tree", "--locked", "-e", kinds, "--target", target,
               "--prefix", "depth", "-f", "{p}"])
    edges, stack, root = {}, [], None
    for line in out.splitlines():
        m = re.match(r"^(\d+)(\S+) v(\S+)", line)
        if not m:
            continue
        depth, node = int(m.group(1)), (m.group(2), m.group(3))
        del stack[depth:]
        if depth == 0:
            root = node
        else:
            edges.setdefault(stack[-1], set()).add(node)
        edges.setdefault(node, set())
        stack.append(node)
    if root is None:
        fail(f"cargo tree printed no graph for {target}")
    return edges, root


# Why a vendored crate is not in the binary: the first of these whose graph
# (cargo tree -e KINDS, for TARGETS or, with "all", every platform) has it.
# The Comment of its debian/copyright paragraph.
NOT_LINKED = [
    ("normal", TARGETS, "proc-macro",
     "Not in the binary: used only by proc-macros, which run inside the compiler "
     "on the build host."),
    ("normal,build", TARGETS, "build-dependency",
     "Not in the binary: used only by build scripts, on the build host."),
    ("normal,build,dev", TARGETS, "dev-dependency",
     "Not in the binary: used only by the tests and benchmarks."),
    ("normal,build,dev", ("all",), "other platforms",
     "Not in the binary: a dependency for other platforms only (its target cfg "
     "does not match Linux); not built here."),
]
NOT_BUILT = ("not built",
             "Not in the binary: not built at all (an optional dependency that no "
             "enabled feature turns on; Cargo.lock lists it all the same).")


def bundled_packages():
    """The root package, {(name, version): package} of every vendored crate,
    the subset of what is linked in (the union over TARGETS),
    {target: set of (name, version) linked in}, and, for the crates that are
    not linked in, {(name, version): (short reason, comment)}."""
    metadata = json.loads(run(["cargo", "metadata", "--locked", "--format-version", "1"]))
    packages = {}
    for package in metadata["packages"]:
        key = (package["name"], package["version"])
        if key in packages:
            fail(f"{key[0]} {key[1]} comes from two sources; tell them apart in this script")
        packages[key] = package

    def is_proc_macro(key):
        return any("proc-macro" in t["kind"] for t in packages[key]["targets"])

    found, sets = {}, {}
    for target in TARGETS:
        edges, root = cargo_tree(target)
        seen, todo = set(), [root]
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            if node not in packages:
                fail(f"cargo tree lists {node[0]} {node[1]}, cargo metadata does not")
            seen.add(node)
            if node != root and is_proc_macro(node) and not FOLLOW_PROC_MACRO_DEPENDENCIES:
                continue
            todo.extend(edges[node])
        sets[target] = seen
        found.update({key: packages[key] for key in seen})
    root_package = packages[root]
    del found[root]

    vendored = {key: p for key, p in packages.items() if key != root}
    for (name, version), package in sorted(vendored.items()):
        if package["source"] is None:
            fail(f"{name} {version} is a path dependency: cargo vendor does not copy it; "
                 "describe its files in debian/copyright by hand and here")
    locked = {(p["name"], p["version"]) for p in tomllib.loads(CARGO_LOCK.read_text())["package"]
              if "source" in p}
    if locked != set(vendored):
        fail("cargo metadata's packages differ from Cargo.lock's: "
             f"only in cargo metadata {sorted(set(vendored) - locked)}, "
             f"only in Cargo.lock {sorted(locked - set(vendored))}")

    why = {}
    for kinds, targets, reason, comment in NOT_LINKED:
        for target in targets:
            for key in cargo_tree(target, kinds)[0]:
                if key in vendored and key not in found and key not in why:
                    why[key] = (reason, comment)
    for key in vendored:
        if key not in found and key not in why:
            why[key] = NOT_BUILT
    return root_package, vendored, found, sets, why


def check_openssl(bundled):
    """openssl-sys with `vendored` compiles OpenSSL in unless OPENSSL_NO_VENDOR
    is set (and not "0") when it builds; the packages' builds set it in
    .cargo/config.toml."""
    if not any(name == "openssl-sys" for name, _ in bundled):
        return
    env = tomllib.loads(CARGO_CONFIG.read_text()).get("env", {}) if CARGO_CONFIG.exists() else {}
    value = env.get("OPENSSL_NO_VENDOR")
    if isinstance(value, dict):
        value = value.get("value")
    if value in (None, "0"):
        fail(".cargo/config.toml no longer sets OPENSSL_NO_VENDOR: pingora-openssl's "
             "`vendored` feature would compile OpenSSL into the binary; describe it in "
             "SYS_CRATES[\"openssl-sys\"] (OpenSSL 3 is Apache-2.0)")


# ----------------------------------------------------------- licence handling

def crate_dir(package):
    return Path(package["manifest_path"]).parent


def crate_licence(package):
    where = f"{package['name']} {package['version']}"
    if package["license"]:
        return parse_spdx(package["license"], where)
    if package["license_file"]:
        path = crate_dir(package) / package["license_file"]
        if package["name"] in LICENSE_FILE_CRATES:
            return parse_spdx(LICENSE_FILE_CRATES[package["name"]], where)
        head = "".join(path.read_text(errors="replace").splitlines(True)[:20])
        fail(f"{where} has no SPDX licence, only the licence file {path}:\n{head}\n"
             "Read it and add the crate to LICENSE_FILE_CRATES.")
    fail(f"{where} declares no licence at all")


def licence_text(name, packages):
    """The body of the stand-alone paragraph for licence short name `name`;
    its text comes from one of `packages` (the vendored crates)."""
    if name.startswith("LicenseRef-"):
        crate = name[len("LicenseRef-"):]
        package = next((p for (n, _), p in sorted(packages.items()) if n == crate), None)
        if package is None or not package["license_file"]:
            fail(f"{name}: no vendored crate {crate} with a licence file")
        return clean_text((crate_dir(package) / package["license_file"]).read_text(), None, name)
    if name not in LICENSES:
        users = sorted(f"{n} {v}" for (n, v), p in packages.items()
                       if name in ids(crate_licence(p)))
        fail(f"unknown licence {name!r} (used by {', '.join(users) or 'code in SYS_CRATES'}): "
             "check that it is acceptable, then add it to LICENSES with a text")
    kind, *rest = LICENSES[name]
    if kind == "common":
        return COMMON_LICENSE_NOTICES[name]
    crate, path, start = rest
    versions = sorted((v for (n, v) in packages if n == crate), key=version_key)
    if not versions:
        fail(f"the text of {name} comes from {crate}, which is no longer vendored: "
             "pick another vendored crate under that licence in LICENSES")
    text = clean_text((crate_dir(packages[(crate, versions[-1])]) / path).read_text(), start,
                      f"{crate}-{versions[-1]}/{path}")
    if kind == "exception":
        return licence_text(name.split(" WITH ")[0], packages) + "\n" + text
    return text


def clean_text(text, start, where):
    lines = [line.expandtabs().rstrip() for line in text.splitlines()]
    if start is not None:
        first = next((i for i, line in enumerate(lines) if line.lstrip().startswith(start)), None)
        if first is None:
            fail(f"{where}: no line starting with {start!r}")
        lines = lines[first:]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def copyright_lines(files):
    """Copyright holders named in license files ("Copyright (c) X", "(C) X")."""
    holders = []
    for path in files:
        for line in path.read_text().splitlines():
            m = re.match(r"^\s*(?:Copyright\b\s*(?:\((?:c|C)\)|©)?|\((?:c|C)\)|©)\s*(\S.*)$", line)
            if m and m.group(1) not in holders:
                holders.append(m.group(1).rstrip())
    if not holders:
        fail(f"no copyright line in {', '.join(map(str, files))}")
    return holders


LICENCE_TEXT_NAME = re.compile(r"^(?:LICEN[CS]E|COPYING|COPYRIGHT|UNLICENSE|NOTICE)", re.I)
COPYRIGHT_WORD = re.compile(r"(?:\bCopyright\b\s*(?:\(c\)|©)?|\(c\)|©)\s*", re.I)
YEARS = r"\d{4}(?:\s*-\s*(?:\d{4}|\$YEAR)?)?"


def header_holders(directory, excluded, where):
    """The copyright holders named near the top of the files under directory
    (not in the excluded directories, not licence texts), each holder once with
    the range of years it is given: ["1995-2026 The OpenSSL Project Authors",
    ...], sorted by first year, longest range first, then name."""
    years_by_holder = {}
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if Path(root, d) not in excluded)
        for file in sorted(files):
            if LICENCE_TEXT_NAME.match(file):
                continue
            with open(Path(root, file), "rb") as stream:
                head = [stream.readline() for _ in range(HEADER_LINES)]
            for line in b"".join(head).decode("utf-8", "replace").splitlines():
                line = re.sub(r"^[\s#*/;!%'\"-]*", "", line)
                if not COPYRIGHT_WORD.match(line):
                    continue
                for statement in COPYRIGHT_WORD.split(line)[1:]:
                    statement = re.sub(r"\s*\*/.*$", "", statement)
                    statement = re.sub(r"\.?\s*All rights reserved.*$", "", statement, flags=re.I)
                    statement = statement.strip(" \t.,")
                    m = (re.match(rf"^(?P<y>(?:{YEARS}\s*,?\s*)+)(?:by\s+)?(?P<h>\S.*)$",
                                  statement)
                         or re.match(rf"^(?P<h>.*?)[\s,]+(?P<y>{YEARS}(?:\s*,\s*{YEARS})*)$",
                                     statement))
                    if not m:
                        continue
                    years, holder = m.group("y"), m.group("h")
                    holder = " ".join(holder.split()).strip(" ,.")
                    found = [int(y) for y in re.findall(r"\d{4}", years)]
                    if holder and found:
                        years_by_holder.setdefault(holder, set()).update(found)
    if not years_by_holder:
        fail(f"{where}: no copyright line in the files under {directory}")
    lines = []
    for holder, years in years_by_holder.items():
        first, last = min(years), max(years)
        lines.append((first, -last, holder.casefold(), holder,
                      f"{first}-{last} {holder}" if last != first else f"{first} {holder}"))
    return [line for *_, line in sorted(lines)]


def crate_authors(package):
    authors = []
    for author in package["authors"]:
        author = " ".join(author.split())
        if author and author not in authors:
            authors.append(author)
    return authors or [f"the {package['name']} authors"]


def other_code(package):
    """The SYS_CRATES "c" and "source" entries of package, checked, as
    (subdir, licence tree, copyright holders, comment or None)."""
    name, version = package["name"], package["version"]
    where = f"{name} {version}"
    entry = SYS_CRATES.get(name, {})
    items = [(*e, None) for e in entry.get("c", [])] + list(entry.get("source", []))
    result = []
    for i, (subdir, expression, holders_from, _cited, comment) in enumerate(items):
        directory = crate_dir(package) / subdir
        if not directory.is_dir():
            fail(f"{where}: SYS_CRATES names {subdir}/, which the crate no longer has")
        for earlier in items[:i]:  # later paragraphs win: the deeper one must be later
            if Path(subdir) in Path(earlier[0]).parents:
                fail(f"{where}: in SYS_CRATES, {earlier[0]}/ must come after {subdir}/")
        if holders_from == HEADERS:
            excluded = {crate_dir(package) / later[0] for later in items[i + 1:]
                        if Path(subdir) in Path(later[0]).parents}
            holders = header_holders(directory, excluded, where)
        elif holders_from == AUTHORS:
            holders = crate_authors(package)
        else:
            holders = copyright_lines([crate_dir(package) / f for f in holders_from])
        result.append((subdir, parse_spdx(expression, f"{where} {subdir}"), holders, comment))
    return result


# ------------------------------------------------------------- debian/copyright

def field(name, lines):
    """A deb822 field; continuation lines indented, empty lines as " ."."""
    first, *rest = lines
    out = [f"{name}: {first}".rstrip()]
    out += [f" {line}" if line else " ." for line in rest]
    return "\n".join(out)


def comment_field(text):
    return "\n".join(textwrap.wrap(text, 79, initial_indent="Comment: ",
                                   subsequent_indent=" ", break_on_hyphens=False))


def paragraphs(text):
    return [p for p in re.split(r"\n\s*\n", text.strip("\n")) if p.strip()]


def field_value(paragraph, name):
    m = re.search(rf"^{name}:[ \t]*(.*)$", paragraph, re.M | re.I)
    return m.group(1).strip() if m else None


def render_copyright(current, vendored, why):
    paras = paragraphs(current)
    if not paras or field_value(paras[0], "Format") is None:
        fail(f"{COPYRIGHT}: no DEP-5 header paragraph")
    # Kept as they are: the header and the project's own Files paragraphs.
    kept = [paras[0]] + [p for p in paras[1:] if field_value(p, "Files") is not None
                         and not field_value(p, "Files").startswith("vendor/")]
    names = set()
    for p in kept[1:]:
        licence = field_value(p, "License")
        names |= set(re.split(r",?\s+(?:and|or)\s+", licence))

    out = list(kept)
    for key in sorted(vendored, key=lambda k: (k[0], version_key(k[1]))):
        package = vendored[key]
        name, version = key
        where = f"{name} {version}"
        base = f"vendor/{name}-{version}"
        tree = crate_licence(package)
        names |= ids(tree)
        lines = [field("Files", [f"{base}/*"]),
                 field("Copyright", crate_authors(package)),
                 field("License", [dep5(tree, where)])]
        if key in why:
            lines.append(comment_field(why[key][1]))
        out.append("\n".join(lines))
        for subdir, c_tree, holders, comment in other_code(package):
            names |= ids(c_tree)
            lines = [field("Files", [f"{base}/{subdir}/*"]),
                     field("Copyright", holders),
                     field("License", [dep5(c_tree, where)])]
            if comment:
                lines.append(comment_field(comment))
            out.append("\n".join(lines))
    for name in sorted(names, key=lambda n: (n.lower(), n)):
        out.append(field("License", [dep5_name(name)] + licence_text(name, vendored).splitlines()))
    return "\n\n".join(out) + "\n"


# ------------------------------------------------------------------ the spec

def spec_licence(root, bundled):
    own = canonical(parse_spdx(root["license"], root["name"]))
    terms = []
    for (name, version), package in bundled.items():
        trees = [crate_licence(package)]
        for subdir, expression, _files, _cited in SYS_CRATES.get(name, {}).get("c", []):
            trees.append(parse_spdx(expression, f"{name} {version} {subdir}"))
        for tree in trees:
            tree = canonical(tree)
            terms.extend(tree[1] if tree[0] == "AND" else [tree])
    for tree in terms:
        for name in ids(tree):
            if name not in LICENSES and not name.startswith("LicenseRef-"):
                licence_text(name, bundled)  # fails with the crates that use it
    own_terms = own[1] if own[0] == "AND" else [own]
    rest = sorted({spdx(t, True) for t in terms} - {spdx(t, True) for t in own_terms},
                  key=lambda s: (s.strip("()").lower(), s))
    return " AND ".join([spdx(own, True) if own[0] == "OR" else spdx(own)] + rest)


def check_rpmlint_filter(licence):
    """Debian's rpmlint knows no licence names and warns "invalid-license" for
    each identifier (and "invalid-license-exception" for each exception);
    rpm/pingora-lb.rpmlintrc filters the ones the spec's License names. Only
    those: rpmlint reports a filter that matches nothing as an error. Keep that
    filter in step with what this script writes."""
    filters = [re.compile(m.group(1)) for m in
               re.finditer(r"""^\s*addFilter\s*\(\s*r?["'](.*)["']\s*\)""",
                           RPMLINTRC.read_text(), re.M)
               if "invalid-license" in m.group(1)]
    warnings = set()
    for name in ids(parse_spdx(licence, "the spec's License")):
        licence_id, _, exception = name.partition(" WITH ")
        warnings.add(f"invalid-license {licence_id}")
        if exception:
            warnings.add(f"invalid-license-exception {exception}")
    missing = sorted(w for w in warnings
                     if not any(f.search(f"pingora-lb.x86_64: W: {w}") for f in filters))
    if missing:
        fail(f"{RPMLINTRC.relative_to(REPO)}: the invalid-license filters do not cover "
             f"{', '.join(missing)}; add them")


def render_spec(current, licence):
    lines = current.splitlines(True)
    found = [i for i, line in enumerate(lines) if re.match(r"^License:", line)]
    if len(found) != 1:
        fail(f"{SPEC}: expected exactly one License: line, found {len(found)}")
    i = found[0]
    padding = re.match(r"^License:([ \t]*)", lines[i]).group(1) or " "
    lines[i] = f"License:{padding}{licence}\n"
    if i > 0 and lines[i - 1].startswith("# License: generated by"):
        lines[i - 1] = SPEC_COMMENT + "\n"
    else:
        lines.insert(i, SPEC_COMMENT + "\n")
    return "".join(lines)


# ------------------------------------------------------------------------ main

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true",
                       help="exit 1 with a diff if the files are not up to date")
    group.add_argument("--list", action="store_true",
                       help="print the vendored crates and their licences, and why "
                            "those not in the binary are there")
    options = parser.parse_args()

    root, vendored, bundled, sets, why = bundled_packages()
    for (name, _version), package in sorted(vendored.items()):
        if name in SYS_CRATES:
            continue
        if package["links"]:
            fail(f"{name} links the native library {package['links']!r}: find out whether "
                 "it compiles C code into the binary or bundles some, and describe it in "
                 "SYS_CRATES")
        if name.endswith(("-sys", "-src")):
            fail(f"{name}: find out whether it builds, bundles or links native code, and "
                 "describe it in SYS_CRATES")
    stale = sorted(set(SYS_CRATES) - {name for name, _ in vendored})
    if stale:
        fail(f"SYS_CRATES describes {', '.join(stale)}, no longer in Cargo.lock; remove them")
    check_openssl(bundled)

    if options.list:
        for key in sorted(vendored, key=lambda k: (k[0], version_key(k[1]))):
            if key in bundled:
                only = [t for t in TARGETS if key not in sets[t]]
                note = f"  (not on {', '.join(only)})" if only else ""
            else:
                note = f"  [not in the binary: {why[key][0]}]"
            print(f"{key[0]} {key[1]}  {spdx(crate_licence(vendored[key]))}{note}")
        return 0

    licence = spec_licence(root, bundled)
    check_rpmlint_filter(licence)
    outputs = {
        COPYRIGHT: render_copyright(COPYRIGHT.read_text(), vendored, why),
        SPEC: render_spec(SPEC.read_text(), licence),
    }
    if options.check:
        status = 0
        for path, text in outputs.items():
            current = path.read_text()
            if current != text:
                status = 1
                rel = path.relative_to(REPO)
                sys.stdout.writelines(difflib.unified_diff(
                    current.splitlines(True), text.splitlines(True),
                    f"a/{rel}", f"b/{rel} (regenerated from Cargo.lock)"))
        if status:
            print("bundled-licenses: out of date; run python3 tools/bundled-licenses.py",
                  file=sys.stderr)
        return status
    for path, text in outputs.items():
        if path.read_text() != text:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.chmod(tmp, path.stat().st_mode)
            os.replace(tmp, path)
            print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
