import t from 'tap'
import {
  applyCatalogCommand,
  clusterJsonOf,
  emptyCatalog,
  type Catalog,
  type CatalogCommand,
} from '../../src/witness/catalog.js'
import { parseClusterConfig } from '../../src/daemon/cluster-config.js'
import { GiB } from '../../src/core/units.js'

const nobodyDown = { down: new Set<string>() }

function run(commands: CatalogCommand[], start: Catalog = emptyCatalog): Catalog {
  let catalog = start
  for (const command of commands) {
    const result = applyCatalogCommand(catalog, command, nobodyDown)
    if (!result.ok) throw new Error(`${command.type}: ${result.message}`)
    catalog = result.catalog
  }
  return catalog
}

/** Two sites with one registered node each and a witness site. */
function stretched(): Catalog {
  return run([
    { type: 'addDomain', name: 'site-a', kind: 'data' },
    { type: 'addDomain', name: 'site-b', kind: 'data' },
    { type: 'addDomain', name: 'site-w', kind: 'witness' },
    { type: 'addNode', name: 'node-a', domain: 'site-a', replication: '127.0.0.1:10811' },
    { type: 'addNode', name: 'node-b', domain: 'site-b', replication: '127.0.0.1:10821' },
    { type: 'registerNode', name: 'node-a', nbd: '127.0.0.1:10810', capacityBytes: 100 * GiB },
    { type: 'registerNode', name: 'node-b', nbd: '127.0.0.1:10820', capacityBytes: 100 * GiB },
  ])
}

function refusal(
  catalog: Catalog,
  command: CatalogCommand,
  down: ReadonlySet<string> = new Set(),
): { code: string; message: string } {
  const result = applyCatalogCommand(catalog, command, { down })
  if (result.ok) throw new Error(`${command.type} was accepted`)
  return { code: result.code, message: result.message }
}

t.test('a cluster built from nothing: every change counts a revision', async (t) => {
  const catalog = stretched()
  t.equal(catalog.revision, 7)
  const created = run(
    [{ type: 'createVolume', name: 'vm1', sizeBytes: 10 * GiB, preferredDomain: 'site-b' }],
    catalog,
  )
  t.equal(created.revision, 8)
  t.same(created.volumes, [
    {
      name: 'vm1',
      sizeBytes: 10 * GiB,
      preferredDomain: 'site-b',
      replicas: ['node-b', 'node-a'],
      primary: 'node-b',
      onLostQuorum: 'error',
      resyncRateBytes: 0,
      followTheWriter: false,
    },
  ])
  const deleted = run([{ type: 'deleteVolume', name: 'vm1' }], created)
  t.same(deleted.volumes, [])
  t.equal(deleted.revision, 9)
})

t.test('repeating a command that already took effect changes nothing', async (t) => {
  const catalog = stretched()
  for (const command of [
    { type: 'addDomain', name: 'site-a', kind: 'data' },
    { type: 'addNode', name: 'node-a', domain: 'site-a', replication: '127.0.0.1:10811' },
    { type: 'registerNode', name: 'node-a', nbd: '127.0.0.1:10810', capacityBytes: 100 * GiB },
  ] as const) {
    const result = applyCatalogCommand(catalog, command, nobodyDown)
    t.same(result, { ok: true, catalog, changed: false }, command.type)
  }
  const withVolume = run([{ type: 'createVolume', name: 'v', sizeBytes: GiB }], catalog)
  const again = applyCatalogCommand(
    withVolume,
    { type: 'createVolume', name: 'v', sizeBytes: GiB },
    nobodyDown,
  )
  t.equal(again.ok && again.changed, false, 'the same create again')
})

t.test('bad input is refused with a reason, and the catalog is unchanged', async (t) => {
  const catalog = stretched()
  const cases: [CatalogCommand, string, RegExp][] = [
    [
      { type: 'addDomain', name: 'Site A', kind: 'data' },
      'INVALID_ARGUMENT',
      /domain name "Site A" is not valid/,
    ],
    [
      { type: 'addDomain', name: 'site-a', kind: 'witness' },
      'ALREADY_EXISTS',
      /exists already, as a data domain/,
    ],
    [
      { type: 'addNode', name: 'node-c', domain: 'site-x', replication: '127.0.0.1:1' },
      'NOT_FOUND',
      /there is no domain site-x \(domains: site-a, site-b, site-w\); add it first: duplex domain add site-x --kind data/,
    ],
    [
      { type: 'addNode', name: 'node-c', domain: 'site-w', replication: '127.0.0.1:1' },
      'INVALID_ARGUMENT',
      /site-w is a witness domain/,
    ],
    [
      { type: 'addNode', name: 'node-a', domain: 'site-b', replication: '127.0.0.1:2' },
      'ALREADY_EXISTS',
      /node node-a exists already/,
    ],
    [
      { type: 'addNode', name: 'node-c', domain: 'site-a', replication: '127.0.0.1:10811' },
      'ALREADY_EXISTS',
      /node-a already replicates at 127\.0\.0\.1:10811/,
    ],
    [
      { type: 'addNode', name: 'node-c', domain: 'site-a', replication: '0.0.0.0:7' },
      'INVALID_ARGUMENT',
      /wildcard address/,
    ],
    [
      { type: 'addNode', name: 'node-c', domain: 'site-a', replication: 'nowhere' },
      'INVALID_ARGUMENT',
      /is not HOST:PORT/,
    ],
    [{ type: 'removeDomain', name: 'site-a' }, 'FAILED_PRECONDITION', /still has nodes \(node-a\)/],
    [{ type: 'removeDomain', name: 'site-x' }, 'NOT_FOUND', /there is no domain site-x/],
    [{ type: 'removeNode', name: 'node-x' }, 'NOT_FOUND', /there is no node node-x/],
    [
      { type: 'registerNode', name: 'node-x', nbd: '127.0.0.1:1', capacityBytes: 1 },
      'NOT_FOUND',
      /duplex node add node-x --domain DOMAIN --address HOST:PORT/,
    ],
    [{ type: 'createVolume', name: 'v', sizeBytes: 1000 }, 'INVALID_ARGUMENT', /multiple of 4 KiB/],
    [
      { type: 'createVolume', name: 'v', sizeBytes: 500 * GiB },
      'FAILED_PRECONDITION',
      /cannot place v: no data domain has an active node with 500\.0 GiB free/,
    ],
    [
      { type: 'createVolume', name: 'v', sizeBytes: GiB, preferredDomain: 'site-w' },
      'FAILED_PRECONDITION',
      /site-w is a witness domain/,
    ],
    [{ type: 'deleteVolume', name: 'nope' }, 'VOLUME_NOT_FOUND', /there is no volume nope/],
    [
      { type: 'resizeVolume', name: 'nope', sizeBytes: GiB },
      'VOLUME_NOT_FOUND',
      /there is no volume nope/,
    ],
  ]
  for (const [command, code, message] of cases) {
    const found = refusal(catalog, command)
    t.equal(found.code, code, `${command.type}: ${found.message}`)
    t.match(found.message, message)
  }
})

t.test('both replicas never in one site, and down nodes receive nothing', async (t) => {
  const oneSite = run([
    { type: 'addDomain', name: 'site-a', kind: 'data' },
    { type: 'addDomain', name: 'site-w', kind: 'witness' },
    { type: 'addNode', name: 'a1', domain: 'site-a', replication: '10.0.0.1:1' },
    { type: 'addNode', name: 'a2', domain: 'site-a', replication: '10.0.0.2:1' },
    { type: 'registerNode', name: 'a1', nbd: '10.0.0.1:2', capacityBytes: 100 * GiB },
    { type: 'registerNode', name: 'a2', nbd: '10.0.0.2:2', capacityBytes: 100 * GiB },
  ])
  t.match(
    refusal(oneSite, { type: 'createVolume', name: 'v', sizeBytes: GiB }).message,
    /a volume needs two data domains \(sites\) and the cluster has 1 \(site-a\)/,
  )
  const catalog = stretched()
  t.match(
    refusal(catalog, { type: 'createVolume', name: 'v', sizeBytes: GiB }, new Set(['node-b']))
      .message,
    /only one data domain has an active node with 1\.0 GiB free \(site-a\)/,
  )
  const unregistered = run(
    [
      {
        type: 'addNode',
        name: 'node-c',
        domain: 'site-b',
        replication: '127.0.0.1:10831',
        capacityBytes: 500 * GiB,
      },
    ],
    catalog,
  )
  const placed = run([{ type: 'createVolume', name: 'v', sizeBytes: GiB }], unregistered)
  t.notOk(
    placed.volumes[0]?.replicas.includes('node-c'),
    'a node that never registered (no NBD address yet) receives nothing',
  )
})

t.test('a node with replicas, and the last witness domain, cannot be removed', async (t) => {
  const catalog = run([{ type: 'createVolume', name: 'v', sizeBytes: GiB }], stretched())
  t.match(
    refusal(catalog, { type: 'removeNode', name: 'node-a' }).message,
    /node node-a holds replicas of v; move them first \(duplex node drain node-a\)/,
  )
  t.match(
    refusal(catalog, { type: 'removeDomain', name: 'site-w' }).message,
    /witness domain of 1 volume\(s\)/,
  )
  t.equal(
    refusal(catalog, { type: 'resizeVolume', name: 'v', sizeBytes: 2 * GiB }).code,
    'NOT_SUPPORTED',
  )
})

t.test('a node follows the catalog as a cluster file, checked by the same parser', async (t) => {
  const catalog = run(
    [
      {
        type: 'createVolume',
        name: 'v',
        sizeBytes: GiB,
        onLostQuorum: 'suspend',
        resyncRateBytes: 100e6,
      },
    ],
    stretched(),
  )
  const config = parseClusterConfig(clusterJsonOf(catalog, '127.0.0.1:10815'), 'catalog')
  t.same(config.witness, { host: '127.0.0.1', port: 10815 })
  t.same(
    config.nodes.map((node) => [node.name, node.domain, node.replication.port]),
    [
      ['node-a', 'site-a', 10811],
      ['node-b', 'site-b', 10821],
    ],
  )
  t.match(config.volumes[0], {
    name: 'v',
    sizeBytes: GiB,
    replicas: ['node-a', 'node-b'],
    primary: 'node-a',
    onLostQuorum: 'suspend',
    resyncRateBytes: 100e6,
    followTheWriter: false,
  })
})
