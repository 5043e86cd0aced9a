/**
 * A cluster built from nothing with CLI commands only, against real processes: a witness keeps
 * the catalog, three nodes in two sites follow it. Volumes are created, read back as tables and
 * JSON, served to qemu-io, and deleted (space freed on both nodes); bad input gets a clear error
 * and changes nothing; placement never puts both replicas in one site, even when only one site
 * has nodes up.
 */
import t from 'tap'
import type { Test } from 'tap'
import fs from 'node:fs/promises'
import path from 'node:path'
import {
  adminCli,
  duplex,
  freePorts,
  missingTools,
  run,
  spawnDaemon,
  startWitness,
  tempDir,
  until,
} from '../lib/node-process.js'
import type { DaemonProcess } from '../lib/node-process.js'
import { NbdClient } from '../lib/nbd-client.js'

const skip = await missingTools(['qemu-io'])

interface NodeRow {
  name: string
  domain: string
  up: boolean
  nbd: string
  usedBytes: number
  replicas: string[]
}

interface VolumeRow {
  name: string
  sizeBytes: number
  owner?: string
  inSync?: boolean
  nbd: string[]
  replicas: { node: string; domain: string; state: string }[]
}

t.test('a stretched cluster built with the CLI alone', { skip: skip ?? false }, async (t) => {
  const witness = await startWitness()
  t.teardown(() => witness.stop())
  const { cli, json, ok } = adminCli(witness.address)
  const refused = async (
    t: Test,
    code: number,
    message: RegExp,
    ...args: string[]
  ): Promise<void> => {
    const result = await cli(...args)
    t.equal(result.code, code, `duplex ${args.join(' ')} exits ${code}`)
    t.match(result.stderr, message)
  }

  // Sites and nodes, as an admin adds them; the mistakes an admin makes are refused.
  const port = await freePorts(3)
  await refused(
    t,
    3,
    /there is no domain site-a \(domains: none yet\); add it first: duplex domain add site-a --kind data/,
    ...['node', 'add', 'node-a1', '--domain', 'site-a', '--address', `127.0.0.1:${port}`],
  )
  await ok(t, 'domain', 'add', 'site-a')
  await ok(t, 'domain', 'add', 'site-b', '--kind', 'data')
  await ok(t, 'domain', 'add', 'site-w', '--kind', 'witness')
  await refused(
    t,
    1,
    /domain site-a exists already, as a data domain/,
    ...['domain', 'add', 'site-a', '--kind', 'witness'],
  )
  await refused(t, 2, /domain name "Site A" is not valid/, 'domain', 'add', 'Site A')
  const nodes = [
    { name: 'node-a1', domain: 'site-a', replication: `127.0.0.1:${port}` },
    { name: 'node-a2', domain: 'site-a', replication: `127.0.0.1:${port + 1}` },
    { name: 'node-b1', domain: 'site-b', replication: `127.0.0.1:${port + 2}` },
  ]
  for (const node of nodes) {
    await ok(t, 'node', 'add', node.name, '--domain', node.domain, '--address', node.replication)
  }
  await refused(
    t,
    1,
    /node node-a1 exists already/,
    ...['node', 'add', 'node-a1', '--domain', 'site-b', '--address', '127.0.0.1:1'],
  )
  await refused(
    t,
    2,
    /site-w is a witness domain; storage nodes go to data domains/,
    ...['node', 'add', 'node-w', '--domain', 'site-w', '--address', '127.0.0.1:2'],
  )
  await refused(
    t,
    1,
    /cannot place early: no data domain has an active node/,
    ...['volume', 'create', 'early', '--size', '1G'],
  )
  t.same(await json<VolumeRow[]>('volume', 'list'), [], 'a refused create leaves no volume')

  // The nodes start following the catalog; they register where clients reach them.
  const dirs: string[] = []
  const running: DaemonProcess[] = []
  t.teardown(async () => {
    await Promise.all(running.map((daemon) => daemon.stop()))
    await Promise.all(dirs.map((dir) => fs.rm(dir, { recursive: true, force: true })))
  })
  for (const node of nodes) {
    const dir = await tempDir(`duplex-${node.name}-`)
    dirs.push(dir)
    // One node reads its settings from a config file, as a systemd unit would give it.
    const config = path.join(dir, 'node.json')
    await fs.writeFile(
      config,
      JSON.stringify({ name: node.name, 'data-dir': dir, witness: witness.address }),
    )
    const args =
      node.name === 'node-b1'
        ? ['node', '--config', config, '--listen', '127.0.0.1:0']
        : [
            ...['node', '--name', node.name, '--data-dir', dir, '--listen', '127.0.0.1:0'],
            ...['--witness', witness.address],
          ]
    running.push(await spawnDaemon(node.name, args))
  }
  const listed = await until('three nodes up', async () => {
    const rows = await json<NodeRow[]>('node', 'list')
    return rows.every((row) => row.up && row.nbd !== '') ? rows : undefined
  })
  t.same(
    listed.map((row) => [row.name, row.domain]),
    nodes.map((node) => [node.name, node.domain]),
  )
  const table = await ok(t, 'node', 'list')
  t.match(table, /^NAME\s+DOMAIN\s+STATE\s+UP/, 'a table for people')
  t.match(table, /node-b1\s+site-b\s+active\s+yes/)

  // Volumes: placed in two sites, served, shown.
  t.match(
    await ok(
      t,
      'volume',
      'create',
      'vol1',
      '--size',
      '64M',
      '--preferred-domain',
      'site-b',
      '--wait',
    ),
    /volume vol1 \(64\.0 MiB\) on node-b1 \(site-b\) and node-a\d \(site-a\), primary node-b1[^]*vol1: both replicas in sync after \d+ s/,
  )
  await ok(t, 'volume', 'create', 'vol2', '--size', '32M', '--on-lost-quorum', 'suspend')
  await refused(
    t,
    1,
    /cannot place huge: no data domain has an active node with 100\.0 TiB free \(the most free in site-a is/,
    ...['volume', 'create', 'huge', '--size', '100T'],
  )
  await refused(t, 2, /cannot read size "lots"/, 'volume', 'create', 'bad', '--size', 'lots')
  const volumes = await until('both volumes in sync', async () => {
    const rows = await json<VolumeRow[]>('volume', 'list')
    return rows.length === 2 && rows.every((row) => row.inSync === true) ? rows : undefined
  })
  t.same(
    volumes.map((row) => row.name),
    ['vol1', 'vol2'],
    'the refused volumes are not in the catalog',
  )
  for (const volume of volumes) {
    const domains = volume.replicas.map((replica) => replica.domain).sort()
    t.same(domains, ['site-a', 'site-b'], `${volume.name}: one replica in each site`)
  }
  const vol1 = await json<VolumeRow>('volume', 'show', 'vol1')
  t.equal(vol1.owner, 'node-b1', 'the primary runs in the preferred site')
  const [primaryUri, otherUri] = vol1.nbd
  if (primaryUri === undefined || otherUri === undefined) throw new Error('no NBD URIs')
  const write = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 0 4M', primaryUri])
  t.equal(write.code, 0, write.stderr)
  const read = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x3c 0 4M', otherUri])
  t.equal(read.code, 0, `written through one site, read through the other: ${read.stderr}`)
  t.match(await ok(t, 'volume', 'show', 'vol1'), /sync:\s+in sync/)
  const status = await json<{ attention: string[] }>('status')
  t.same(status.attention, [], 'nothing needs attention')
  t.match(await ok(t, 'status'), /All volumes in sync, all nodes up\./)
  await refused(t, 3, /there is no volume nope/, 'volume', 'show', 'nope')

  // Deleting frees the space on both nodes.
  const vol2 = volumes.find((row) => row.name === 'vol2')
  const holders = vol2?.replicas.map((replica) => replica.node) ?? []
  await refused(t, 2, /run again with --yes/, 'volume', 'delete', 'vol2')
  // A client still attached on one holder: that node keeps the data until it lets go.
  const held = (await json<NodeRow[]>('node', 'list')).find((row) => row.name === holders[0])
  const attached = await NbdClient.open(Number(held?.nbd.split(':')[1]), 'vol2')
  await ok(t, 'volume', 'delete', 'vol2', '--yes')
  const heldDir = dirs[nodes.findIndex((node) => node.name === holders[0])] ?? ''
  const localNames = async (dir: string): Promise<string[]> => {
    const local = await duplex(['volume', 'list', '--data-dir', dir, '--output', 'json'])
    return (JSON.parse(local.stdout) as { name: string }[]).map((v) => v.name)
  }
  await new Promise((resolve) => setTimeout(resolve, 1500))
  t.ok((await localNames(heldDir)).includes('vol2'), 'not deleted under an attached client')
  attached.destroy()
  for (const holder of holders) {
    const dir = dirs[nodes.findIndex((node) => node.name === holder)] ?? ''
    await until(`vol2 gone from ${holder}`, async () =>
      (await localNames(dir)).includes('vol2') ? undefined : true,
    ).catch(() => undefined)
    t.notOk((await localNames(dir)).includes('vol2'), `${holder} deleted its replica of vol2`)
  }
  await refused(t, 3, /there is no volume vol2/, 'volume', 'delete', 'vol2', '--yes')
  const afterDelete = await json<NodeRow[]>('node', 'list')
  t.equal(
    afterDelete.reduce((sum, row) => sum + row.usedBytes, 0),
    2 * 64 * 1024 * 1024,
    'only vol1 holds space',
  )

  // A node that holds replicas cannot be removed; an empty one can.
  const empty = afterDelete.find((row) => row.replicas.length === 0)
  const busy = afterDelete.find((row) => row.replicas.length > 0)
  await refused(
    t,
    1,
    /holds replicas of vol1; move them first/,
    'node',
    'remove',
    busy?.name ?? '',
    '--yes',
  )
  if (empty !== undefined) await ok(t, 'node', 'remove', empty.name, '--yes')

  // With site-b down, no volume can be placed: never both replicas in site-a.
  const siteB = running[nodes.findIndex((node) => node.name === 'node-b1')]
  await siteB?.stop()
  await until('node-b1 down', async () => {
    const rows = await json<NodeRow[]>('node', 'list')
    return rows.find((row) => row.name === 'node-b1')?.up === false ? true : undefined
  })
  await refused(
    t,
    1,
    /only one data domain has an active node with 1\.0 GiB free \(site-a\); the replicas must be in two different sites/,
    ...['volume', 'create', 'lonely', '--size', '1G'],
  )
  const attention = await json<{ attention: string[] }>('status')
  t.match(attention.attention.join('\n'), /node-b1 \(site-b\) is down/, 'status says what is down')
  t.same(
    (await json<VolumeRow[]>('volume', 'list')).map((row) => row.name),
    ['vol1'],
    'and nothing changed',
  )
})
