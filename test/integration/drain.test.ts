/**
 * Draining a node and moving a replica, against real processes: a witness and four nodes in two
 * sites, built with the CLI. While a verifying writer keeps writing through the site that stays,
 * `duplex node drain` moves every replica off a node of the other site (one of them its primary)
 * to the other node of that site; the writer sees no error, every acknowledged write reads back
 * through the new node, the replicas compare equal, and the drained node deletes its data.
 * `duplex volume move` then moves a replica back, and bad moves are refused without a change;
 * `duplex volume resize` grows a volume once the client attached on one node lets go.
 * A second cluster kills the target of a move, then its source, with kill -9 in the middle of the
 * copy: the move starts over each time and completes, and no acknowledged write is lost.
 */
import t from 'tap'
import fs from 'node:fs/promises'
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
import { SteadyWriter } from '../lib/steady-writer.js'

const skip = await missingTools(['qemu-io'])

interface NodeRow {
  name: string
  domain: string
  up: boolean
  nbd: string
  state: string
  replicas: string[]
}

interface VolumeRow {
  name: string
  owner?: string
  inSync?: boolean
  replicas: { node: string; domain: string; state: string }[]
  move?: { from: string; to: string }
}

t.test(
  'drain a node while a writer keeps verifying',
  { skip: skip ?? false, timeout: 240_000 },
  async (t) => {
    const witness = await startWitness()
    t.teardown(() => witness.stop())
    const { cli, json, ok } = adminCli(witness.address, 120_000)

    const port = await freePorts(4)
    const nodes = [
      { name: 'a1', domain: 'site-a', replication: `127.0.0.1:${port}` },
      { name: 'a2', domain: 'site-a', replication: `127.0.0.1:${port + 1}` },
      { name: 'b1', domain: 'site-b', replication: `127.0.0.1:${port + 2}` },
      { name: 'b2', domain: 'site-b', replication: `127.0.0.1:${port + 3}` },
    ]
    await ok(t, 'domain', 'add', 'site-a')
    await ok(t, 'domain', 'add', 'site-b')
    await ok(t, 'domain', 'add', 'site-w', '--kind', 'witness')
    // a2 is the smaller node of site-a, so placement puts the volumes on a1.
    for (const node of nodes) {
      const capacity = node.name === 'a2' ? ['--capacity', '2G'] : ['--capacity', '4G']
      await ok(
        t,
        ...['node', 'add', node.name, '--domain', node.domain, '--address', node.replication],
        ...capacity,
      )
    }
    const dirs: string[] = []
    const running = new Map<string, DaemonProcess>()
    t.teardown(async () => {
      await Promise.all([...running.values()].map((daemon) => daemon.stop()))
      await Promise.all(dirs.map((dir) => fs.rm(dir, { recursive: true, force: true })))
    })
    for (const node of nodes) {
      const dir = await tempDir(`duplex-${node.name}-`)
      dirs.push(dir)
      const args = ['node', '--name', node.name, '--data-dir', dir, '--listen', '127.0.0.1:0']
      running.set(node.name, await spawnDaemon(node.name, [...args, '--witness', witness.address]))
    }
    const rows = await until('four nodes up', async () => {
      const listed = await json<NodeRow[]>('node', 'list')
      return listed.every((row) => row.up && row.nbd !== '') ? listed : undefined
    })
    const nbdPort = (name: string): number =>
      Number(rows.find((row) => row.name === name)?.nbd.split(':')[1])
    const dirOf = (name: string): string =>
      dirs[nodes.findIndex((node) => node.name === name)] ?? ''

    await ok(
      t,
      'volume',
      'create',
      'db',
      '--size',
      '256M',
      '--preferred-domain',
      'site-a',
      '--wait',
    )
    await ok(
      t,
      'volume',
      'create',
      'logs',
      '--size',
      '64M',
      '--preferred-domain',
      'site-b',
      '--wait',
    )
    const before = await json<VolumeRow[]>('volume', 'list')
    for (const volume of before) {
      t.ok(
        volume.replicas.some((replica) => replica.node === 'a1'),
        `${volume.name} has a replica on a1`,
      )
    }
    t.equal(before.find((v) => v.name === 'db')?.owner, 'a1', 'a1 is the primary of db')
    // Data that was there before the move, written through a1.
    const seeded = await run('qemu-io', [
      ...['-f', 'raw', '-c', 'write -P 0x5d 128M 32M'],
      `nbd://127.0.0.1:${nbdPort('a1')}/db`,
    ])
    t.equal(seeded.code, 0, seeded.stderr)

    // The writers write through site-b, which stays; a1 is drained under them.
    const dbHolderB = before
      .find((v) => v.name === 'db')
      ?.replicas.find((replica) => replica.domain === 'site-b')?.node
    const logsHolderB = before
      .find((v) => v.name === 'logs')
      ?.replicas.find((replica) => replica.domain === 'site-b')?.node
    if (dbHolderB === undefined || logsHolderB === undefined) throw new Error('no site-b replica')
    const dbWriter = await SteadyWriter.start(nbdPort(dbHolderB), 'db', 0, 512)
    const logsWriter = await SteadyWriter.start(nbdPort(logsHolderB), 'logs', 4096, 128)
    await dbWriter.progress(50)
    await logsWriter.progress(50)

    const drained = await ok(t, 'node', 'drain', 'a1', '--wait')
    t.match(drained, /a1 is draining: it receives no new replicas; moving .*db to a2/)
    t.match(drained, /draining a1: done after \d+ s/)
    t.match(drained, /a1 holds no replicas; remove it with: duplex node remove a1 --yes/)
    await dbWriter.progress(50)
    await logsWriter.progress(50)
    const dbReport = await dbWriter.stop()
    const logsReport = await logsWriter.stop()
    t.equal(dbReport.errors, 0, `db writer: no error (${dbReport.lastError ?? ''})`)
    t.equal(logsReport.errors, 0, `logs writer: no error (${logsReport.lastError ?? ''})`)
    t.comment(
      `longest stall: db ${dbReport.longestStallMs.toFixed(0)} ms, logs ${logsReport.longestStallMs.toFixed(0)} ms`,
    )

    const after = await until('both volumes in sync on a2', async () => {
      const volumes = await json<VolumeRow[]>('volume', 'list')
      return volumes.every(
        (volume) =>
          volume.inSync === true &&
          volume.replicas.some((replica) => replica.node === 'a2' && replica.state === 'UpToDate'),
      )
        ? volumes
        : undefined
    })
    for (const volume of after) {
      t.same(
        volume.replicas.map((replica) => replica.domain).sort(),
        ['site-a', 'site-b'],
        `${volume.name}: still one replica per site`,
      )
      t.notOk(
        volume.replicas.some((replica) => replica.node === 'a1'),
        `${volume.name} left a1`,
      )
    }
    t.same(
      await dbWriter.verify(nbdPort('a2'), 'db'),
      [],
      'every acknowledged db write reads back through a2',
    )
    t.same(await logsWriter.verify(nbdPort('a2'), 'logs'), [], 'and every logs write')
    const old = await run('qemu-io', [
      ...['-f', 'raw', '-c', 'read -P 0x5d 128M 32M'],
      `nbd://127.0.0.1:${nbdPort('a2')}/db`,
    ])
    t.equal(old.code, 0, `data from before the move reads back through a2: ${old.stderr}`)
    for (const volume of ['db', 'logs']) {
      const verify = await cli('volume', 'verify', volume)
      t.equal(verify.code, 0, `duplex volume verify ${volume}: ${verify.stdout}${verify.stderr}`)
    }
    const a1 = (await json<NodeRow[]>('node', 'list')).find((row) => row.name === 'a1')
    t.equal(a1?.state, 'draining')
    t.same(a1?.replicas, [], 'a1 holds nothing')
    await until('a1 deleted its replicas', async () => {
      const local = await duplex(['volume', 'list', '--data-dir', dirOf('a1'), '--output', 'json'])
      return local.code === 0 && (JSON.parse(local.stdout) as unknown[]).length === 0
        ? true
        : undefined
    })

    // Bad moves are refused and change nothing.
    const refusedMove = await cli('volume', 'move', 'db', '--from', 'a2', '--to', 'b2')
    t.equal(refusedMove.code, 1)
    t.match(refusedMove.stderr, /b2 is in site-b; a replica moves within its domain \(site-a\)/)
    const refusedTarget = await cli('volume', 'move', 'db', '--from', 'a2', '--to', 'a1')
    t.equal(refusedTarget.code, 1)
    t.match(refusedTarget.stderr, /a1 is draining and receives no replicas/)
    const noFrom = await cli('volume', 'move', 'db')
    t.equal(noFrom.code, 2)
    t.match(noFrom.stderr, /name the replica to move: --from/)
    t.same(
      (await json<VolumeRow[]>('volume', 'list')).map((volume) => volume.move),
      [undefined, undefined],
      'nothing is moving',
    )

    // A single move within site-b, the replica of the primary of logs included.
    await ok(t, 'node', 'remove', 'a1', '--yes')
    const from = logsHolderB
    const to = from === 'b1' ? 'b2' : 'b1'
    t.match(
      await ok(t, 'volume', 'move', 'logs', '--from', from, '--to', to, '--wait'),
      new RegExp(`logs: moving the replica on ${from} to ${to}[^]*logs's move: done after`),
    )
    const logs = await until('logs in sync after its move', async () => {
      const [volume] = (await json<VolumeRow[]>('volume', 'list')).filter((v) => v.name === 'logs')
      return volume?.inSync === true ? volume : undefined
    })
    t.same(logs.replicas.map((replica) => replica.node).sort(), ['a2', to].sort())
    t.same(await logsWriter.verify(nbdPort(to), 'logs'), [], 'logs reads back through its new node')

    // Growing a volume: it waits for the client attached on one node, then both grow.
    const logsNodes = logs.replicas.map((replica) => replica.node)
    const holder = logsNodes[0] ?? ''
    const attached = await NbdClient.open(nbdPort(holder), 'logs')
    t.match(
      await ok(t, 'volume', 'resize', 'logs', '--size', '128M'),
      /volume logs is 128\.0 MiB in the catalog; each node grows its replica once no client has it open there/,
    )
    const sizes = async (): Promise<(number | undefined)[]> =>
      (await json<{ replicas: { sizeBytes?: number }[] }>('volume', 'show', 'logs')).replicas.map(
        (replica) => replica.sizeBytes,
      )
    await new Promise((resolve) => setTimeout(resolve, 2000))
    t.ok(
      (await sizes()).includes(64 * 1024 * 1024),
      'the node with a client attached keeps the old size meanwhile',
    )
    attached.destroy()
    t.match(
      await ok(t, 'volume', 'resize', 'logs', '--size', '128M', '--wait'),
      /logs: both replicas are 128\.0 MiB after \d+ s/,
    )
    const info = await run('qemu-img', [
      'info',
      '--output=json',
      `nbd://127.0.0.1:${nbdPort(to)}/logs`,
    ])
    t.equal(
      (JSON.parse(info.stdout) as { 'virtual-size': number })['virtual-size'],
      128 * 1024 * 1024,
    )
    const grownWrite = await run('qemu-io', [
      ...['-f', 'raw', '-c', 'write -P 0x42 100M 4M'],
      `nbd://127.0.0.1:${nbdPort(logsNodes[0] ?? '')}/logs`,
    ])
    t.equal(grownWrite.code, 0, grownWrite.stderr)
    const grownRead = await run('qemu-io', [
      ...['-f', 'raw', '-c', 'read -P 0x42 100M 4M', '-c', 'read -P 0 120M 4M'],
      `nbd://127.0.0.1:${nbdPort(logsNodes[1] ?? '')}/logs`,
    ])
    t.equal(grownRead.code, 0, `the grown part replicates: ${grownRead.stderr}`)
    t.same(await logsWriter.verify(nbdPort(to), 'logs'), [], 'the data from before is kept')
    const shrink = await cli('volume', 'resize', 'logs', '--size', '64M')
    t.equal(shrink.code, 1)
    t.match(shrink.stderr, /volumes only grow/)
  },
)

t.test(
  'a move survives kill -9 of its target and of its source',
  { skip: skip ?? false, timeout: 240_000 },
  async (t) => {
    const witness = await startWitness()
    t.teardown(() => witness.stop())
    const admin = adminCli(witness.address, 120_000)
    const { cli, json } = admin
    const ok = (...args: string[]): Promise<string> => admin.ok(t, ...args)
    const port = await freePorts(3)
    const nodes = [
      { name: 'a1', domain: 'site-a', replication: `127.0.0.1:${port}` },
      { name: 'a2', domain: 'site-a', replication: `127.0.0.1:${port + 1}` },
      { name: 'b1', domain: 'site-b', replication: `127.0.0.1:${port + 2}` },
    ]
    await ok('domain', 'add', 'site-a')
    await ok('domain', 'add', 'site-b')
    await ok('domain', 'add', 'site-w', '--kind', 'witness')
    for (const node of nodes) {
      await ok('node', 'add', node.name, '--domain', node.domain, '--address', node.replication)
    }
    const dirs = new Map<string, string>()
    const running = new Map<string, DaemonProcess>()
    t.teardown(async () => {
      await Promise.all([...running.values()].map((daemon) => daemon.stop()))
      await Promise.all(
        [...dirs.values()].map((dir) => fs.rm(dir, { recursive: true, force: true })),
      )
    })
    // Fixed NBD ports, so that a restarted node is found where it was.
    const nbdBase = await freePorts(3)
    const start = async (name: string): Promise<void> => {
      const dir = dirs.get(name) ?? (await tempDir(`duplex-${name}-`))
      dirs.set(name, dir)
      const nbd = `127.0.0.1:${nbdBase + nodes.findIndex((node) => node.name === name)}`
      const args = ['node', '--name', name, '--data-dir', dir, '--listen', nbd]
      running.set(name, await spawnDaemon(name, [...args, '--witness', witness.address]))
    }
    for (const node of nodes) await start(node.name)
    await until('three nodes up', async () => {
      const listed = await json<NodeRow[]>('node', 'list')
      return listed.every((row) => row.up && row.nbd !== '') ? true : undefined
    })
    const nbdPort = (name: string): number =>
      nbdBase + nodes.findIndex((node) => node.name === name)

    // b1 is the primary; the copy is slowed down so that the kills land in the middle of it.
    await ok(
      ...['volume', 'create', 'big', '--size', '512M', '--preferred-domain', 'site-b'],
      ...['--resync-rate', '40M', '--wait'],
    )
    const filled = await run('qemu-io', [
      ...['-f', 'raw', '-c', 'write -P 0x7e 0 200M'],
      `nbd://127.0.0.1:${nbdPort('b1')}/big`,
    ])
    t.equal(filled.code, 0, filled.stderr)
    const writer = await SteadyWriter.start(nbdPort('b1'), 'big', 300 * 1024 * 1024, 256)
    await writer.progress(20)
    const copied = (what: string, atLeast: number): Promise<boolean> =>
      until(
        what,
        async () => {
          const volume = await json<VolumeRow & { move?: { doneBytes: number } }>(
            'volume',
            'show',
            'big',
          )
          return (volume.move?.doneBytes ?? 0) >= atLeast ? true : undefined
        },
        60_000,
      )
    const moved = ok('volume', 'move', 'big', '--from', 'a1', '--to', 'a2', '--wait')

    await copied('the copy under way', 32 * 1024 * 1024)
    await running.get('a2')?.kill()
    t.comment('killed the target (a2) in the middle of the copy')
    await new Promise((resolve) => setTimeout(resolve, 1000))
    await start('a2')
    await copied('the copy under way again', 32 * 1024 * 1024)
    await running.get('a1')?.kill()
    t.comment('killed the source (a1) in the middle of the copy')
    await writer.progress(20) // b1 runs alone meanwhile
    await new Promise((resolve) => setTimeout(resolve, 1000))
    await start('a1')

    t.match(await moved, /big's move: done after \d+ s/)
    await writer.progress(20)
    const report = await writer.stop()
    t.equal(report.errors, 0, `the writer saw no error (${report.lastError ?? ''})`)
    const volume = await until('big in sync on a2 and b1', async () => {
      const shown = await json<VolumeRow>('volume', 'show', 'big')
      return shown.inSync === true &&
        shown.replicas.every((replica) => replica.state === 'UpToDate')
        ? shown
        : undefined
    })
    t.same(volume.replicas.map((replica) => replica.node).sort(), ['a2', 'b1'])
    t.same(await writer.verify(nbdPort('a2'), 'big'), [], 'every acknowledged write reads on a2')
    const old = await run('qemu-io', [
      ...['-f', 'raw', '-c', 'read -P 0x7e 0 200M'],
      `nbd://127.0.0.1:${nbdPort('a2')}/big`,
    ])
    t.equal(old.code, 0, `the data from before the move reads back on a2: ${old.stderr}`)
    const verify = await cli('volume', 'verify', 'big')
    t.equal(verify.code, 0, `${verify.stdout}${verify.stderr}`)
  },
)
