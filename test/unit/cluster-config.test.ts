import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import type { Test } from 'tap'
import {
  accessRefusal,
  addressPatternProblem,
  findNode,
  parseClusterConfig,
  readClusterConfig,
  volumesOfNode,
} from '../../src/daemon/cluster-config.js'
import { GiB, MiB } from '../../src/core/units.js'

/** A valid cluster of three nodes in two domains; each test breaks one thing. */
function validJson() {
  return {
    witness: 'witness.example:10900',
    nodes: [
      { name: 'node-a', domain: 'site-a', replication: '127.0.0.1:10810' },
      { name: 'node-b', domain: 'site-b', replication: 'node-b.example:10820' },
      { name: 'node-c', domain: 'site-a', replication: '[::1]:10830' },
    ] as Record<string, unknown>[],
    volumes: [
      {
        name: 'demo',
        size: '1G',
        replicas: ['node-a', 'node-b'],
        primary: 'node-a',
        followTheWriter: true,
        onLostQuorum: 'suspend',
        resyncRate: '100M',
      },
      { name: 'logs', size: 4 * MiB, replicas: ['node-b', 'node-c'], primary: 'node-c' },
    ] as Record<string, unknown>[],
  }
}

/** Asserts INVALID_ARGUMENT with a message that starts with `cluster.json: <path>: `. */
function rejects(t: Test, json: unknown, path: string, ...fragments: string[]): void {
  let thrown: unknown
  try {
    parseClusterConfig(json, 'cluster.json')
  } catch (error) {
    thrown = error
  }
  t.match(thrown, { code: 'INVALID_ARGUMENT' }, `${path} is an INVALID_ARGUMENT`)
  const message = thrown instanceof Error ? thrown.message : ''
  t.ok(message.startsWith(`cluster.json: ${path}: `), `names ${path}: ${message}`)
  for (const fragment of fragments) t.ok(message.includes(fragment), `mentions ${fragment}`)
}

t.test('a valid file round-trips into plain data', async (t) => {
  const config = parseClusterConfig(validJson(), 'cluster.json')
  t.same(config, {
    witness: { host: 'witness.example', port: 10900 },
    nodes: [
      { name: 'node-a', domain: 'site-a', replication: { host: '127.0.0.1', port: 10810 } },
      { name: 'node-b', domain: 'site-b', replication: { host: 'node-b.example', port: 10820 } },
      { name: 'node-c', domain: 'site-a', replication: { host: '::1', port: 10830 } },
    ],
    volumes: [
      {
        name: 'demo',
        sizeBytes: GiB,
        replicas: ['node-a', 'node-b'],
        primary: 'node-a',
        followTheWriter: {},
        onLostQuorum: 'suspend',
        resyncRateBytes: 100 * MiB,
      },
      {
        name: 'logs',
        sizeBytes: 4 * MiB,
        replicas: ['node-b', 'node-c'],
        primary: 'node-c',
        followTheWriter: false,
        onLostQuorum: 'error',
        resyncRateBytes: 0,
      },
    ],
  })
  t.same(parseClusterConfig(JSON.parse(JSON.stringify(validJson())), 'cluster.json'), config)
})

t.test('volumesOfNode and findNode', async (t) => {
  const config = parseClusterConfig(validJson(), 'cluster.json')
  const names = (node: string) =>
    volumesOfNode(config, node).map(({ volume, peer }) => `${volume.name}->${peer.name}`)
  t.same(names('node-a'), ['demo->node-b'])
  t.same(names('node-b'), ['demo->node-a', 'logs->node-c'])
  t.same(names('node-c'), ['logs->node-b'])
  t.same(names('node-x'), [])
  t.equal(findNode(config, 'node-b')?.domain, 'site-b')
  t.equal(findNode(config, 'node-x'), undefined)
})

t.test('empty or missing volumes are fine; nodes need at least one entry', async (t) => {
  const json = validJson()
  t.same(parseClusterConfig({ nodes: json.nodes, volumes: [] }, 'c').volumes, [])
  t.same(parseClusterConfig({ nodes: json.nodes }, 'c').volumes, [])
  rejects(t, { nodes: [], volumes: [] }, 'nodes', 'at least one node')
  rejects(t, { volumes: [] }, 'nodes', 'missing')
  rejects(t, { nodes: {} }, 'nodes', 'expected a list')
  rejects(t, { nodes: json.nodes, volumes: 'none' }, 'volumes', 'expected a list')
})

t.test(
  'the witness is optional and checked; onLostQuorum and resyncRate are checked',
  async (t) => {
    const json = validJson()
    t.equal(parseClusterConfig({ nodes: json.nodes }, 'c').witness, undefined)
    rejects(t, { ...json, witness: 'nowhere' }, 'witness', 'HOST:PORT')
    rejects(t, { ...json, witness: 10900 }, 'witness')
    const volume = { ...json.volumes[1], onLostQuorum: 'panic' }
    rejects(
      t,
      { ...json, volumes: [volume] },
      'volumes[0].onLostQuorum',
      'expected "error" or "suspend"',
    )
    const slow = { ...json.volumes[1], resyncRate: '10K' }
    rejects(t, { ...json, volumes: [slow] }, 'volumes[0].resyncRate', 'below 1 MiB per second')
    const bad = { ...json.volumes[1], resyncRate: 'fast' }
    rejects(t, { ...json, volumes: [bad] }, 'volumes[0].resyncRate')
  },
)

t.test('the top level must be an object', async (t) => {
  for (const json of [null, [], 'nodes', 3]) {
    t.throws(
      () => parseClusterConfig(json, 'cluster.json'),
      { code: 'INVALID_ARGUMENT', message: /^cluster\.json: expected a JSON object/ },
      JSON.stringify(json),
    )
  }
})

t.test('unknown keys are errors at every level', async (t) => {
  rejects(t, { ...validJson(), node: [] }, 'node', 'unknown key', 'nodes, volumes')
  const json = validJson()
  json.nodes[1] = { ...json.nodes[1], replicaton: '1.2.3.4:5' }
  rejects(t, json, 'nodes[1].replicaton', 'unknown key', 'name, domain, replication')
  const json2 = validJson()
  json2.volumes[0] = { ...json2.volumes[0], folowTheWriter: true }
  rejects(t, json2, 'volumes[0].folowTheWriter', 'unknown key', 'followTheWriter')
})

t.test('entries must be objects with the required keys', async (t) => {
  const json = validJson()
  json.nodes[0] = 'node-a' as unknown as Record<string, unknown>
  rejects(t, json, 'nodes[0]', 'expected an object', 'string "node-a"')
  for (const key of ['name', 'domain', 'replication']) {
    const json = validJson()
    delete json.nodes[2]?.[key]
    rejects(t, json, `nodes[2].${key}`, 'missing')
  }
  for (const key of ['name', 'size', 'replicas', 'primary']) {
    const json = validJson()
    delete json.volumes[1]?.[key]
    rejects(t, json, `volumes[1].${key}`, 'missing')
  }
  const json2 = validJson()
  json2.nodes[0] = { ...json2.nodes[0], name: 7 }
  rejects(t, json2, 'nodes[0].name', 'expected a string', 'number 7')
})

t.test('node and domain names follow the volume name rule', async (t) => {
  for (const bad of ['', 'Node-A', '-node', 'node a', 'x'.repeat(65), 'nöde']) {
    const json = validJson()
    json.nodes[0] = { ...json.nodes[0], name: bad }
    rejects(t, json, 'nodes[0].name', 'node name', JSON.stringify(bad))
    const json2 = validJson()
    json2.nodes[1] = { ...json2.nodes[1], domain: bad }
    rejects(t, json2, 'nodes[1].domain', 'domain', JSON.stringify(bad))
  }
  const json = validJson()
  json.nodes[0] = { ...json.nodes[0], name: '0.node_a-1', domain: 'x'.repeat(64) }
  json.volumes = []
  t.equal(parseClusterConfig(json, 'c').nodes[0]?.name, '0.node_a-1')
})

t.test('node names are unique', async (t) => {
  const json = validJson()
  json.nodes[2] = { ...json.nodes[2], name: 'node-a' }
  rejects(t, json, 'nodes[2].name', 'node-a', 'used twice')
})

t.test('replication is HOST:PORT with a reachable host and a port 1-65535', async (t) => {
  const bad = [
    '127.0.0.1',
    '127.0.0.1:0',
    '127.0.0.1:65536',
    '127.0.0.1:port',
    ':10810',
    '0.0.0.0:10810',
    '[::]:10810',
    '1.2.3.256:10810',
    '[node-a]:10810',
    '[::g]:10810',
    'bad host:10810',
    '-host:10810',
    'host_name:10810',
  ]
  for (const endpoint of bad) {
    const json = validJson()
    json.nodes[0] = { ...json.nodes[0], replication: endpoint }
    rejects(t, json, 'nodes[0].replication', `"${endpoint}"`)
  }
  const json = validJson()
  json.nodes[0] = { ...json.nodes[0], replication: 10810 }
  rejects(t, json, 'nodes[0].replication', 'expected a string', 'number 10810')
  const good: [string, string, number][] = [
    ['10.0.0.1:1', '10.0.0.1', 1],
    ['node-a.site-a.example:65535', 'node-a.site-a.example', 65535],
    ['[fd00::1]:10810', 'fd00::1', 10810],
    ['localhost:10810', 'localhost', 10810],
  ]
  for (const [endpoint, host, port] of good) {
    const json = validJson()
    json.nodes[0] = { ...json.nodes[0], replication: endpoint }
    const node = parseClusterConfig(json, 'c').nodes[0]
    t.same(node?.replication, { host, port }, endpoint)
  }
})

t.test('two nodes may not share a replication endpoint', async (t) => {
  const json = validJson()
  json.nodes[2] = { ...json.nodes[2], replication: 'NODE-B.example:10820' }
  rejects(t, json, 'nodes[2].replication', 'node-c', 'node-b')
  const json2 = validJson()
  json2.nodes[2] = { ...json2.nodes[2], replication: '127.0.0.1:10820' }
  t.equal(parseClusterConfig(json2, 'c').nodes.length, 3, 'same host, other port is fine')
})

t.test('volume names are valid and unique', async (t) => {
  const json = validJson()
  json.volumes[1] = { ...json.volumes[1], name: 'Demo' }
  rejects(t, json, 'volumes[1].name', '"Demo"')
  const json2 = validJson()
  json2.volumes[1] = { ...json2.volumes[1], name: 'demo' }
  rejects(t, json2, 'volumes[1].name', 'demo', 'used twice')
})

t.test('volume sizes go through parseSize and validateVolumeSize', async (t) => {
  const cases: [unknown, string][] = [
    ['1Q', '"1Q"'],
    ['', '""'],
    [0, 'volume size 0'],
    [4097, 'volume size 4097'],
    ['1.5k', 'volume size 1536'],
    [2 ** 51, `volume size ${2 ** 51}`],
    [-4096, 'volume size -4096'],
    [true, 'boolean true'],
    [null, 'null'],
  ]
  for (const [size, fragment] of cases) {
    const json = validJson()
    json.volumes[0] = { ...json.volumes[0], size }
    rejects(t, json, 'volumes[0].size', fragment)
  }
  const json = validJson()
  json.volumes[0] = { ...json.volumes[0], size: '2T' }
  t.equal(parseClusterConfig(json, 'c').volumes[0]?.sizeBytes, 2 * 1024 * GiB)
})

t.test('exactly two distinct replicas, both known nodes', async (t) => {
  const cases: [unknown, string, string][] = [
    [['node-a'], 'volumes[0].replicas', 'got 1'],
    [['node-a', 'node-b', 'node-c'], 'volumes[0].replicas', 'got 3'],
    ['node-a,node-b', 'volumes[0].replicas', 'expected a list'],
    [['node-a', 'node-a'], 'volumes[0].replicas', 'node-a is named twice'],
    [['node-a', 'node-x'], 'volumes[0].replicas[1]', '"node-x" is not a node'],
    [['node-x', 'node-b'], 'volumes[0].replicas[0]', '"node-x" is not a node'],
    [['node-a', 2], 'volumes[0].replicas[1]', 'expected a string'],
  ]
  for (const [replicas, path, fragment] of cases) {
    const json = validJson()
    json.volumes[0] = { ...json.volumes[0], replicas }
    rejects(t, json, path, fragment)
  }
})

t.test('the two replicas must be in different domains', async (t) => {
  const json = validJson()
  json.volumes[0] = { ...json.volumes[0], replicas: ['node-a', 'node-c'] }
  rejects(
    t,
    json,
    'volumes[0].replicas',
    'node-a and node-c are both in domain site-a; the two replicas must be in different domains',
  )
})

t.test('primary is one of the replicas', async (t) => {
  const json = validJson()
  json.volumes[0] = { ...json.volumes[0], primary: 'node-c' }
  rejects(t, json, 'volumes[0].primary', '"node-c"', 'node-a and node-b')
  const json2 = validJson()
  json2.volumes[0] = { ...json2.volumes[0], primary: ['node-a'] }
  rejects(t, json2, 'volumes[0].primary', 'expected a string', 'a list')
})

t.test('followTheWriter: false, true or tuning settings', async (t) => {
  const withFollow = (value: unknown): unknown => {
    const json = validJson()
    json.volumes[0] = { ...json.volumes[0], followTheWriter: value }
    return json
  }
  rejects(t, withFollow('yes'), 'volumes[0].followTheWriter', 'true, false or an object', '"yes"')
  const tuned = parseClusterConfig(
    withFollow({ windowSeconds: 2, holdSeconds: 1, shareMin: 0.8, bytesMin: '1M' }),
    'cluster.json',
  )
  t.same(tuned.volumes[0]?.followTheWriter, {
    windowMs: 2000,
    holdMs: 1000,
    shareMin: 0.8,
    bytesMin: MiB,
  })
  rejects(
    t,
    withFollow({ holdSeconds: 0 }),
    'volumes[0].followTheWriter.holdSeconds',
    'greater than 0',
    '0',
  )
  rejects(
    t,
    withFollow({ shareMin: 0.5 }),
    'volumes[0].followTheWriter.shareMin',
    'above 0.5',
    '0.5',
  )
  rejects(
    t,
    withFollow({ bytesMin: 'lots' }),
    'volumes[0].followTheWriter.bytesMin',
    'lots',
    'lots',
  )
  rejects(
    t,
    withFollow({ holdSecs: 1 }),
    'volumes[0].followTheWriter.holdSecs',
    'unknown key',
    'holdSecs',
  )
})

t.test('readClusterConfig reads a file and names it in every error', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'duplex-cluster-config-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))

  const good = join(dir, 'cluster.json')
  await writeFile(good, JSON.stringify(validJson(), null, 2))
  t.same(await readClusterConfig(good), parseClusterConfig(validJson(), 'x'))

  const missing = join(dir, 'missing.json')
  await t.rejects(readClusterConfig(missing), {
    code: 'INVALID_ARGUMENT',
    message: `cluster file ${missing} does not exist`,
  })

  const broken = join(dir, 'broken.json')
  await writeFile(broken, '{ "nodes": [ ')
  await t.rejects(readClusterConfig(broken), {
    code: 'INVALID_ARGUMENT',
    message: new RegExp(`^${escape(broken)}: not valid JSON: `),
  })

  const invalid = join(dir, 'invalid.json')
  await writeFile(invalid, JSON.stringify({ nodes: [] }))
  await t.rejects(readClusterConfig(invalid), {
    code: 'INVALID_ARGUMENT',
    message: `${invalid}: nodes: at least one node is needed`,
  })

  await t.rejects(readClusterConfig(dir), {
    code: 'INVALID_ARGUMENT',
    message: new RegExp(`^cannot read cluster file ${escape(dir)}: `),
  })
})

function escape(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')
}

t.test('access lists: who may open a volume over NBD', async (t) => {
  const volume = {
    name: 'v',
    sizeBytes: 4096,
    replicas: ['a', 'b'] as [string, string],
    primary: 'a',
    followTheWriter: false as const,
    onLostQuorum: 'error' as const,
    resyncRateBytes: 0,
    access: { clients: ['hv1'], addresses: ['10.1.0.0/16', 'fd00::/8', '192.0.2.7'] },
  }
  const cases: [string, string | undefined, RegExp | undefined][] = [
    ['10.1.2.3', 'hv1', undefined],
    ['::ffff:10.1.2.3', 'hv1', undefined],
    ['fd12::1', 'hv1', undefined],
    ['192.0.2.7', 'hv1', undefined],
    ['10.2.0.1', 'hv1', /address 10\.2\.0\.1 may not open volume v/],
    ['10.1.2.3', 'hv2', /the certificate "hv2" may not open volume v/],
    ['10.1.2.3', undefined, /open only to TLS clients with a certificate it names/],
  ]
  for (const [address, certificateName, refused] of cases) {
    const reason = accessRefusal(volume, { address, certificateName })
    if (refused === undefined) t.equal(reason, undefined, `${address} ${certificateName ?? '-'} in`)
    else t.match(reason, refused, `${address} ${certificateName ?? '-'} out`)
  }
  t.equal(
    accessRefusal(
      { ...volume, access: { clients: [], addresses: [] } },
      {
        address: '203.0.113.9',
        certificateName: undefined,
      },
    ),
    undefined,
    'empty lists restrict nothing',
  )
  t.equal(addressPatternProblem('2001:db8::/129'), '"2001:db8::/129" has a bad prefix length')
})
