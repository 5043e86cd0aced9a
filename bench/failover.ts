/**
 * `node dist/bench/failover.js`: issue 4's failover measurements on this machine, with the
 * default lease settings (node lease 3 s, peer lease 2 s).
 *
 * 1. Failover stall: a witness and two nodes serving a 1 GiB volume; a loop of single 4 KiB FUA
 *    writes through node-b (the secondary's node, `qemu-io`, one process per write). kill -9
 *    node-a (the primary); the stall is the time from the kill to the completion of the first
 *    write issued after it. Target: at most 5 s.
 * 2. Resync volume and rate: kill node-b, write `--dirty-mib` MiB (default 512) of 1 MiB
 *    sequential writes through node-a (fio) while node-b is away, restart node-b and watch
 *    node-a's metrics: bytes the resync sent against the dirty bytes (target: at most 1.1x), and
 *    the rate from the first copied byte to the last (target: at least 200 MB/s on loopback).
 *
 * Options: --dirty-mib N, --runs N (stall measurements, default 3). Prints a markdown table.
 */
import { writeFileSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import {
  freePort,
  installCleanupHandlers,
  makeTempDir,
  run,
  spawnTracked,
  stopTracked,
  waitForNbd,
} from './proc.js'
import type { Tracked } from './proc.js'

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..')
const cli = join(repoRoot, 'dist', 'src', 'cli', 'main.js')

interface Cluster {
  dir: string
  clusterFile: string
  witness: Tracked
  nodes: Record<'a' | 'b', Tracked | undefined>
  nbd: Record<'a' | 'b', number>
  metrics: Record<'a' | 'b', number>
  start(which: 'a' | 'b'): Tracked
}

async function startCluster(): Promise<Cluster> {
  const dir = makeTempDir('failover')
  const [wPort, ra, rb, na, nb, ma, mb] = await Promise.all(
    Array.from({ length: 7 }, () => freePort()),
  )
  const witnessAddress = `127.0.0.1:${wPort ?? 0}`
  const clusterFile = join(dir, 'cluster.json')
  writeFileSync(
    clusterFile,
    JSON.stringify({
      witness: witnessAddress,
      nodes: [
        { name: 'node-a', domain: 'site-a', replication: `127.0.0.1:${ra ?? 0}` },
        { name: 'node-b', domain: 'site-b', replication: `127.0.0.1:${rb ?? 0}` },
      ],
      volumes: [{ name: 'bench', size: '1G', replicas: ['node-a', 'node-b'], primary: 'node-a' }],
    }),
  )
  const witness = spawnTracked('witness', process.execPath, [
    ...[cli, 'witness', '--data-dir', join(dir, 'w'), '--listen', witnessAddress],
  ])
  const nbd = { a: na ?? 0, b: nb ?? 0 }
  const metrics = { a: ma ?? 0, b: mb ?? 0 }
  const cluster: Cluster = {
    dir,
    clusterFile,
    witness,
    nodes: { a: undefined, b: undefined },
    nbd,
    metrics,
    start(which) {
      const node = spawnTracked(`node-${which}`, process.execPath, [
        ...[cli, 'node', '--name', `node-${which}`, '--data-dir', join(dir, which)],
        ...[
          '--listen',
          `127.0.0.1:${nbd[which]}`,
          '--metrics-listen',
          `127.0.0.1:${metrics[which]}`,
        ],
        ...['--cluster', clusterFile],
      ])
      cluster.nodes[which] = node
      return node
    },
  }
  cluster.start('a')
  cluster.start('b')
  await waitForNbd(uri(cluster, 'a'), [witness])
  await waitForNbd(uri(cluster, 'b'), [witness])
  await waitUpToDate(cluster)
  return cluster
}

function uri(cluster: Cluster, which: 'a' | 'b'): string {
  return `nbd://127.0.0.1:${cluster.nbd[which]}/bench`
}

async function waitUpToDate(cluster: Cluster, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const status = await run(process.execPath, [
      ...[cli, 'volume', 'status', '--cluster', cluster.clusterFile, '--output', 'json'],
    ])
    if (status.code === 0) {
      const rows = JSON.parse(status.stdout) as { state: string }[]
      if (rows.length === 2 && rows.every((row) => row.state === 'UpToDate')) return
    }
    if (Date.now() > deadline) throw new Error(`replicas not UpToDate: ${status.stdout}`)
    await sleep(200)
  }
}

async function metric(port: number, name: string): Promise<number> {
  const text = await fetch(`http://127.0.0.1:${port}/metrics`).then((r) => r.text())
  const match = new RegExp(`^${name}\\{[^}]*volume="bench"[^}]*\\} (\\S+)$`, 'm').exec(text)
  return match?.[1] === undefined ? Number.NaN : Number(match[1])
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

async function qemuWrite(target: string, offset: number): Promise<boolean> {
  const r = await run('qemu-io', [
    ...['-f', 'raw', '-t', 'none', '-c', `write -P 0x5a ${offset} 4k`, target],
  ])
  return r.code === 0 && !r.stderr.includes('failed')
}

/** kill -9 the primary; time to the first completed write issued after it, through node-b. */
async function measureStall(): Promise<number> {
  const cluster = await startCluster()
  try {
    for (let i = 0; i < 20; i++) await qemuWrite(uri(cluster, 'b'), i * 4096)
    const nodeA = cluster.nodes.a
    if (nodeA === undefined) throw new Error('node-a not running')
    const killedAt = performance.now()
    nodeA.child.kill('SIGKILL')
    for (let offset = 0; ; offset += 4096) {
      if (await qemuWrite(uri(cluster, 'b'), offset)) return performance.now() - killedAt
      if (performance.now() - killedAt > 60_000) throw new Error('no write completed in 60 s')
    }
  } finally {
    await stopAll(cluster)
  }
}

async function stopAll(cluster: Cluster): Promise<void> {
  for (const node of Object.values(cluster.nodes)) if (node !== undefined) await stopTracked(node)
  await stopTracked(cluster.witness)
}

interface ResyncResult {
  writtenBytes: number
  dirtyBytes: number
  sentBytes: number
  seconds: number
}

async function measureResync(dirtyMiB: number): Promise<ResyncResult> {
  const cluster = await startCluster()
  try {
    const nodeB = cluster.nodes.b
    if (nodeB === undefined) throw new Error('node-b not running')
    nodeB.child.kill('SIGKILL')
    await nodeB.exited()
    const fio = await run('fio', [
      ...['--name=dirty', '--ioengine=nbd', `--uri=${uri(cluster, 'a')}`, '--rw=write'],
      ...['--bs=1M', '--iodepth=8', `--size=${dirtyMiB}M`, '--offset=128M', '--end_fsync=1'],
    ])
    if (fio.code !== 0) throw new Error(`fio failed: ${fio.stderr}`)
    const dirtyBytes = await metric(cluster.metrics.a, 'duplex_replica_dirty_bytes')
    const sentBefore = await metric(cluster.metrics.a, 'duplex_replication_resync_bytes_total')
    cluster.start('b')
    let first: number | undefined
    let last = performance.now()
    let sent = 0
    const deadline = performance.now() + 600_000
    for (;;) {
      const total = await metric(cluster.metrics.a, 'duplex_replication_resync_bytes_total')
      const left = await metric(cluster.metrics.a, 'duplex_replica_dirty_bytes')
      const now = performance.now()
      if (total > sentBefore) {
        first ??= now
        if (total - sentBefore > sent) last = now
        sent = total - sentBefore
      }
      if (first !== undefined && left === 0) {
        // The two metrics were read one after the other: read the total once more.
        sent =
          (await metric(cluster.metrics.a, 'duplex_replication_resync_bytes_total')) - sentBefore
        break
      }
      if (now > deadline) throw new Error('resync did not finish in 10 min')
      await sleep(20)
    }
    return {
      writtenBytes: dirtyMiB * 1024 * 1024,
      dirtyBytes,
      sentBytes: sent,
      seconds: (last - first) / 1000,
    }
  } finally {
    await stopAll(cluster)
  }
}

async function main(): Promise<void> {
  installCleanupHandlers()
  const args = process.argv.slice(2)
  const option = (name: string, fallback: number): number => {
    const index = args.indexOf(name)
    const value = index >= 0 ? Number(args[index + 1]) : fallback
    if (!Number.isFinite(value) || value <= 0) throw new Error(`${name} must be a positive number`)
    return value
  }
  const dirtyMiB = option('--dirty-mib', 512)
  const runs = option('--runs', 3)
  const stalls: number[] = []
  for (let i = 0; i < runs; i++) {
    stalls.push(await measureStall())
    process.stderr.write(`stall ${i + 1}/${runs}: ${Math.round(stalls[i] ?? 0)} ms\n`)
  }
  const resync = await measureResync(dirtyMiB)
  const mb = (bytes: number): string => (bytes / 1e6).toFixed(1)
  const ratio = resync.sentBytes / resync.dirtyBytes
  const rate = resync.sentBytes / 1e6 / Math.max(resync.seconds, 0.001)
  const worst = Math.max(...stalls)
  process.stdout.write(
    [
      '| measurement | value | target | |',
      '|---|--:|--:|:-:|',
      `| failover stall, kill -9 of the primary (ms, ${runs} runs) | ${stalls.map((s) => Math.round(s)).join(', ')} | ≤ 5000 | ${worst <= 5000 ? 'pass' : 'FAIL'} |`,
      `| resync volume: sent / dirty (${mb(resync.sentBytes)} / ${mb(resync.dirtyBytes)} MB; ${mb(resync.writtenBytes)} MB written) | ${ratio.toFixed(3)}x | ≤ 1.1x | ${ratio <= 1.1 ? 'pass' : 'FAIL'} |`,
      `| resync rate (${resync.seconds.toFixed(2)} s) | ${rate.toFixed(0)} MB/s | ≥ 200 MB/s | ${rate >= 200 ? 'pass' : 'FAIL'} |`,
      '',
    ].join('\n'),
  )
}

main().catch((error: unknown) => {
  process.stderr.write(
    `bench/failover: ${error instanceof Error ? error.message : String(error)}\n`,
  )
  process.exit(1)
})
