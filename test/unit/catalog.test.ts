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
      moveFrom: '',
      moveTo: '',
      allowClients: [],
      allowAddresses: [],
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
  const grown = run([{ type: 'resizeVolume', name: 'v', sizeBytes: 2 * GiB }], catalog)
  t.equal(grown.volumes[0]?.sizeBytes, 2 * GiB, 'a volume grows')
  t.match(refusal(grown, { type: 'resizeVolume', name: 'v', sizeBytes: GiB }), {
    code: 'FAILED_PRECONDITION',
    message: /volumes only grow/,
  })
  t.match(refusal(grown, { type: 'resizeVolume', name: 'v', sizeBytes: 200 * GiB }), {
    code: 'FAILED_PRECONDITION',
    message: /has 98\.0 GiB free; growing to 200\.0 GiB needs 198\.0 GiB more there/,
  })
  const moving = run([{ type: 'moveVolume', name: 'v1', fromNode: 'b1' }], fourNodes())
  t.match(refusal(moving, { type: 'resizeVolume', name: 'v1', sizeBytes: 40 * GiB }), {
    message: /v1 is moving from b1 to b2; resize it once the move completed/,
  })
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

/** Two nodes per data site (a1 and a2 in site-a, b1 and b2 in site-b), two volumes on a1. */
function fourNodes(a2GiB = 30): Catalog {
  return run([
    { type: 'addDomain', name: 'site-a', kind: 'data' },
    { type: 'addDomain', name: 'site-b', kind: 'data' },
    { type: 'addDomain', name: 'site-w', kind: 'witness' },
    ...['a1', 'a2', 'b1', 'b2'].flatMap((name, i): CatalogCommand[] => [
      {
        type: 'addNode',
        name,
        domain: name.startsWith('a') ? 'site-a' : 'site-b',
        replication: `127.0.0.1:${20000 + i}`,
        capacityBytes: (name === 'a2' ? a2GiB : 100) * GiB,
      },
      { type: 'registerNode', name, nbd: `127.0.0.1:${21000 + i}`, capacityBytes: 0 },
    ]),
    { type: 'createVolume', name: 'v1', sizeBytes: 20 * GiB, preferredDomain: 'site-a' },
    { type: 'createVolume', name: 'v2', sizeBytes: 15 * GiB, preferredDomain: 'site-a' },
  ])
}

t.test(
  'volume move: within the domain, to the node with most space or the one named',
  async (t) => {
    const catalog = fourNodes()
    const [v1] = catalog.volumes
    t.same(v1?.replicas, ['a1', 'b1'], 'placed on the largest nodes')
    const moved = run([{ type: 'moveVolume', name: 'v1', fromNode: 'b1' }], catalog)
    t.match(moved.volumes[0], { replicas: ['a1', 'b1'], moveFrom: 'b1', moveTo: 'b2' })
    t.equal(
      run([{ type: 'moveVolume', name: 'v1', fromNode: 'b1' }], moved).revision,
      moved.revision,
      'asked again: no change',
    )
    t.match(refusal(moved, { type: 'moveVolume', name: 'v1', fromNode: 'a1' }), {
      code: 'FAILED_PRECONDITION',
      message:
        /v1 is moving from b1 to b2 already; wait for it, or stop it: duplex volume move v1 --cancel/,
    })
    t.match(refusal(catalog, { type: 'moveVolume', name: 'v1', fromNode: 'a1', toNode: 'b2' }), {
      code: 'FAILED_PRECONDITION',
      message: /b2 is in site-b; a replica moves within its domain \(site-a\)/,
    })
    t.match(refusal(catalog, { type: 'moveVolume', name: 'v1', fromNode: 'b2' }), {
      message: /v1 has no replica on b2/,
    })
    t.match(refusal(catalog, { type: 'moveVolume', name: 'nope', fromNode: 'b2' }), {
      code: 'VOLUME_NOT_FOUND',
    })
    // The incoming copy takes space on its target: a second volume cannot squeeze in after it.
    const both = run([{ type: 'moveVolume', name: 'v1', fromNode: 'a1' }], catalog)
    t.match(both.volumes[0], { moveFrom: 'a1', moveTo: 'a2' })
    t.match(refusal(both, { type: 'moveVolume', name: 'v2', fromNode: 'a1', toNode: 'a2' }), {
      message: /a2 has 10\.0 GiB free, v2 needs 15\.0 GiB/,
    })
    t.match(refusal(both, { type: 'removeNode', name: 'a2' }), {
      code: 'FAILED_PRECONDITION',
      message: /holds replicas of v1/,
    })

    // Completed by the witness: the new pair, the old node gone from it.
    const done = run([{ type: 'completeMove', name: 'v1', fromNode: 'b1', toNode: 'b2' }], moved)
    t.match(done.volumes[0], { replicas: ['a1', 'b2'], moveFrom: '', moveTo: '' })
    t.equal(
      run([{ type: 'completeMove', name: 'v1', fromNode: 'b1', toNode: 'b2' }], done).revision,
      done.revision,
      'completed again (a retried grant): no change',
    )
    t.match(refusal(catalog, { type: 'completeMove', name: 'v1', fromNode: 'b1', toNode: 'b2' }), {
      code: 'FAILED_PRECONDITION',
      message: /the catalog does not move v1's replica from b1 to b2/,
    })
    const fromPrimary = run(
      [{ type: 'completeMove', name: 'v1', fromNode: 'a1', toNode: 'a2' }],
      both,
    )
    t.match(fromPrimary.volumes[0], { replicas: ['a2', 'b1'], primary: 'a2' })
    t.same(catalog.volumes[1]?.replicas, ['a1', 'b2'], 'v2 went to the emptier node of site-b')

    const cancelled = run([{ type: 'cancelMove', name: 'v1' }], moved)
    t.match(cancelled.volumes[0], { replicas: ['a1', 'b1'], moveFrom: '', moveTo: '' })
    t.equal(run([{ type: 'cancelMove', name: 'v1' }], cancelled).revision, cancelled.revision)
  },
)

t.test(
  'node drain: every replica moves within its domain; the node receives nothing',
  async (t) => {
    const catalog = fourNodes(40)
    const draining = run([{ type: 'drainNode', name: 'a1' }], catalog)
    t.match(
      draining.nodes.find((node) => node.name === 'a1'),
      { state: 'draining' },
    )
    t.same(
      draining.volumes.map((volume) => [volume.name, volume.moveFrom, volume.moveTo]),
      [
        ['v1', 'a1', 'a2'],
        ['v2', 'a1', 'a2'],
      ],
    )
    t.equal(run([{ type: 'drainNode', name: 'a1' }], draining).revision, draining.revision)
    t.match(refusal(draining, { type: 'cancelMove', name: 'v1' }), {
      message: /a1 is draining: its replicas must move/,
    })
    t.match(
      refusal(draining, { type: 'createVolume', name: 'v3', sizeBytes: 60 * GiB }),
      { code: 'FAILED_PRECONDITION' },
      'a draining node receives no new volume (a2 is too small for it)',
    )
    t.match(refusal(draining, { type: 'drainNode', name: 'a2' }), {
      code: 'FAILED_PRECONDITION',
      message: /a2 takes part in moves under way \(v1, v2\); drain it once those complete/,
    })
    // Too little room in the domain: refused with the reason, nothing changes.
    const tight = run(
      [{ type: 'createVolume', name: 'v3', sizeBytes: 25 * GiB, preferredDomain: 'site-a' }],
      catalog,
    )
    const refusedDrain = refusal(tight, { type: 'drainNode', name: 'a1' })
    t.match(refusedDrain, {
      code: 'FAILED_PRECONDITION',
      message: /cannot drain a1: .*site-a/,
    })
    const afterMoves = run(
      [
        { type: 'completeMove', name: 'v1', fromNode: 'a1', toNode: 'a2' },
        { type: 'completeMove', name: 'v2', fromNode: 'a1', toNode: 'a2' },
      ],
      draining,
    )
    t.same(
      afterMoves.volumes.map((volume) => volume.replicas),
      [
        ['a2', 'b1'],
        ['a2', 'b2'],
      ],
    )
    const removed = run([{ type: 'removeNode', name: 'a1' }], afterMoves)
    t.notOk(
      removed.nodes.some((node) => node.name === 'a1'),
      'a drained node can be removed',
    )
  },
)

t.test('a move reaches the nodes in the cluster file form', async (t) => {
  const moved = run([{ type: 'moveVolume', name: 'v1', fromNode: 'b1' }], fourNodes())
  const config = parseClusterConfig(clusterJsonOf(moved, '127.0.0.1:10815'), 'x')
  t.same(config.volumes[0]?.move, { from: 'b1', to: 'b2' })
  t.equal(config.volumes[1]?.move, undefined)
})

t.test('volume access lists: checked, kept sorted, passed to the nodes', async (t) => {
  const catalog = run(
    [
      {
        type: 'createVolume',
        name: 'v',
        sizeBytes: GiB,
        allowClients: ['hv2', 'hv1', 'hv1'],
        allowAddresses: ['10.0.0.0/8'],
      },
    ],
    stretched(),
  )
  t.match(catalog.volumes[0], { allowClients: ['hv1', 'hv2'], allowAddresses: ['10.0.0.0/8'] })
  const opened = run(
    [{ type: 'setVolumeAccess', name: 'v', allowClients: [], allowAddresses: [] }],
    catalog,
  )
  t.match(opened.volumes[0], { allowClients: [], allowAddresses: [] })
  t.equal(
    run([{ type: 'setVolumeAccess', name: 'v', allowClients: [], allowAddresses: [] }], opened)
      .revision,
    opened.revision,
    'the same lists again: no change',
  )
  t.match(
    refusal(catalog, {
      type: 'setVolumeAccess',
      name: 'v',
      allowClients: [],
      allowAddresses: ['10.0.0.0/33'],
    }),
    { code: 'INVALID_ARGUMENT', message: /"10\.0\.0\.0\/33" has a bad prefix length/ },
  )
  t.match(
    refusal(catalog, {
      type: 'setVolumeAccess',
      name: 'v',
      allowClients: [],
      allowAddresses: ['hv1.example'],
    }),
    { message: /"hv1\.example" is not an IP address or a CIDR block/ },
  )
  t.match(
    refusal(catalog, {
      type: 'setVolumeAccess',
      name: 'nope',
      allowClients: [],
      allowAddresses: [],
    }),
    { code: 'VOLUME_NOT_FOUND' },
  )
  const config = parseClusterConfig(clusterJsonOf(catalog, '127.0.0.1:10815'), 'x')
  t.same(config.volumes[0]?.access, { clients: ['hv1', 'hv2'], addresses: ['10.0.0.0/8'] })
  t.equal(
    parseClusterConfig(clusterJsonOf(opened, '127.0.0.1:10815'), 'x').volumes[0]?.access,
    undefined,
  )
})
