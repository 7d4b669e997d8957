"""What a JavaScript module requires and what a package.json names, read from their bytes."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stargz_store.layer.jsrequires import package_main, requires_of

MODULE = b"""'use strict';
// const old = require('commented-out');
const express = require('express');
const { v4: uuid } = require("uuid");
const fp = require ( 'lodash/fp' );
import def, { named } from './local.js';
import './side-effect';
export { x } from "../up/x";
const lazy = () => import('dynamic');
const again = require('express');
const computed = require(name);
const s = "not a require('in a string') call";
"""


def test_the_literal_specifiers_in_order_each_once():
    assert requires_of(MODULE) == ["express", "uuid", "lodash/fp", "./local.js", "./side-effect", "../up/x",
                                   "dynamic", "in a string"]


def test_package_entry_points():
    assert package_main(b'{"name": "x", "main": "lib/index.js"}') == "lib/index.js"
    assert package_main(b'{"exports": "./dist/x.js"}') == "./dist/x.js"
    assert package_main(b'{"exports": {".": {"import": "./x.mjs", "require": "./x.cjs"}}}') == "./x.cjs"
    assert package_main(b'{"name": "no-entry"}') is None
    assert package_main(b"[1, 2]") is None
    assert package_main(b"{not json") is None
    assert package_main(b"[" * 100_000 + b"]" * 100_000) is None  # nesting past the parser's limit


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_never_raise(data):
    found = requires_of(data)
    assert found is None or all(isinstance(s, str) for s in found)
    assert package_main(data) is None or isinstance(package_main(data), str)
