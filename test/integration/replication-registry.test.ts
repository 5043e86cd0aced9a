/**
 * The replicated node's export registry: a volume the cluster file places on the node but whose
 * local replica is larger is not served at all (served unreplicated, it would take writes its
 * peer never sees; volumes never shrink); a smaller one grows to the file's size (a resize);
 * volumes the file does not mention are served as before.
 */
import t from 'tap'
import fs from 'node:fs/promises'
import { silentLogger } from '../../src/core/log.js'
import { parseClusterConfig } from '../../src/daemon/cluster-config.js'
import { Replication } from '../../src/daemon/replication.js'
import { NodeStore } from '../../src/replica/store.js'
import { freePorts, tempDir } from '../lib/node-process.js'

const MiB = 1024 * 1024

t.test('a replica larger than the cluster file is not served; a smaller one grows', async (t) => {
  const dir = await tempDir('duplex-registry-')
  const store = await NodeStore.open(dir)
  t.teardown(async () => {
    await store.close()
    await fs.rm(dir, { recursive: true, force: true })
  })
  await store.create('vol', 32 * MiB)
  await store.create('small', 4 * MiB)
  await store.create('local-only', 4 * MiB)
  const port = await freePorts(2)
  const config = parseClusterConfig(
    {
      nodes: [
        { name: 'node-a', domain: 'site-a', replication: `127.0.0.1:${port}` },
        { name: 'node-b', domain: 'site-b', replication: `127.0.0.1:${port + 1}` },
      ],
      volumes: [
        { name: 'vol', size: '16M', replicas: ['node-a', 'node-b'], primary: 'node-a' },
        { name: 'small', size: '8M', replicas: ['node-a', 'node-b'], primary: 'node-a' },
      ],
    },
    'cluster.json',
  )
  const replication = await Replication.start({
    nodeName: 'node-a',
    config,
    store,
    log: silentLogger,
  })
  t.teardown(() => replication.close())
  t.equal(replication.find('vol'), undefined, 'the mismatched volume is not an export')
  t.equal(replication.attach('vol'), undefined, 'and cannot be attached')
  t.same(
    replication.list().map((info) => [info.name, info.sizeBytes]),
    [
      ['local-only', 4 * MiB],
      ['small', 8 * MiB],
    ],
    'the list shows only what is served; a smaller replica grew to the size in the file',
  )
  t.ok(replication.controller('small'), 'and is replicated')
  const local = replication.attach('local-only')
  t.ok(local, 'a volume the file does not mention is served unreplicated')
  local?.detach()
  t.equal(replication.controller('vol'), undefined, 'no replication runs for it')
})
