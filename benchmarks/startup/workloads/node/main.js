// The Node.js workload: require chains through many small modules, one line out.
'use strict';
const express = require('express');
const _ = require('lodash');
const yargs = require('yargs/yargs');
const semver = require('semver');
const debug = require('debug')('bench');
const { v4: uuid } = require('uuid');

const app = express();
app.use(express.json());
app.get('/', (req, res) => res.send('hi'));
const argv = yargs(['--name', 'Stargz Store']).argv;
debug('not printed unless DEBUG is set');
console.log(`hello from node ${process.version} express ${app._router.stack.length} layers, `
  + `${_.kebabCase(argv.name)}, semver ${semver.inc('1.2.3', 'minor')}, uuid ${uuid().length} chars`);
