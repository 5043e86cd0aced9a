/**
 * The deployment material operators copy (deploy/systemd): the example configs pass the same
 * checks as `duplex node|witness --config FILE`, each unit starts its daemon with the config the
 * docs install, runs unprivileged with the hardening options, and passes `systemd-analyze verify`
 * where systemd is installed.
 */
import t from 'tap'
import { readFile } from 'node:fs/promises'
import path from 'node:path'
import {
  checkDaemonConfig,
  nodeConfigOptions,
  witnessConfigOptions,
} from '../../src/cli/daemon-config.js'
import { hasTool, repoRoot, run } from '../lib/node-process.js'

const systemd = path.join(repoRoot, 'deploy/systemd')

t.test('the example configs are valid daemon configs', async (t) => {
  for (const [file, options] of [
    ['site-a/node.json', nodeConfigOptions],
    ['site-b/node.json', nodeConfigOptions],
    ['site-w/witness.json', witnessConfigOptions],
  ] as const) {
    const json: unknown = JSON.parse(await readFile(path.join(systemd, file), 'utf8'))
    const config = checkDaemonConfig(json, file, options)
    t.ok(typeof config['name'] === 'string' && typeof config['data-dir'] === 'string', file)
  }
  const a = JSON.parse(await readFile(path.join(systemd, 'site-a/node.json'), 'utf8')) as Record<
    string,
    string
  >
  const w = JSON.parse(await readFile(path.join(systemd, 'site-w/witness.json'), 'utf8')) as Record<
    string,
    string
  >
  t.equal(a['witness'], w['listen'], 'the nodes follow the witness where it listens')
})

t.test('the units run the daemons unprivileged, hardened, on their configs', async (t) => {
  for (const [unit, command, config, state] of [
    ['duplex-node.service', 'node', '/etc/duplex/node.json', 'duplex'],
    ['duplex-witness.service', 'witness', '/etc/duplex/witness.json', 'duplex-witness'],
  ] as const) {
    const text = await readFile(path.join(systemd, unit), 'utf8')
    const settings = new Map(
      text
        .split('\n')
        .filter((line) => /^[A-Za-z]+=/.test(line))
        .map((line) => [line.slice(0, line.indexOf('=')), line.slice(line.indexOf('=') + 1)]),
    )
    t.match(settings.get('ExecStart'), new RegExp(` ${command} --config ${config}$`), unit)
    t.equal(settings.get('User'), 'duplex', `${unit}: not root`)
    t.equal(settings.get('StateDirectory'), state, `${unit}: its data directory`)
    t.equal(settings.get('KillSignal'), 'SIGTERM', `${unit}: the clean stop`)
    for (const [key, value] of [
      ['NoNewPrivileges', 'yes'],
      ['ProtectSystem', 'strict'],
      ['PrivateDevices', 'yes'],
      ['CapabilityBoundingSet', ''],
      ['RestrictAddressFamilies', 'AF_INET AF_INET6 AF_UNIX'],
    ] as const) {
      t.equal(settings.get(key), value, `${unit}: ${key}=${value}`)
    }
    if (await hasTool('systemd-analyze')) {
      const verify = await run('systemd-analyze', ['verify', '--man=no', path.join(systemd, unit)])
      // Only the unit's own problems count: /opt/duplex is not installed on a test machine.
      const problems = `${verify.stdout}${verify.stderr}`
        .split('\n')
        .filter((line) => line.trim() !== '' && !/is not executable|No such file/.test(line))
      t.same(problems, [], `systemd-analyze verify ${unit}`)
    }
  }
})
