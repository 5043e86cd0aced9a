/**
 * Systems under test ("peers"): each is `{ name, start() }`, and `start()` brings one up on
 * 127.0.0.1 with a fresh 1 GiB sparse volume in its own temp dir, waits until its NBD export
 * answers, and returns the URI, the processes to measure, and `stop()`.
 *
 * Peers today: `duplex` (single node), `qemu-nbd` (unreplicated, writeback cache, same durability
 * contract), `quorum` (QEMU's block-layer quorum of a local file and an NBD child served by a
 * second qemu-nbd: synchronous two-way replication), and `duplex-replicated` (two duplex nodes in
 * two domains with a cluster file; clients use the primary's URI, and the initial sync of the new
 * volume is done before the URI is returned), and `duplex-replicated-tls` (the same with cluster
 * TLS between the nodes: the cost of encryption on the replicated write path).
 */
import { closeSync, ftruncateSync, openSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import {
  freePort,
  makeTempDir,
  removeTempDir,
  run,
  spawnTracked,
  stopTracked,
  waitForNbd,
} from './proc.js'
import type { Tracked } from './proc.js'

export const volumeBytes = 1024 * 1024 * 1024

export interface RunningPeer {
  readonly uri: string
  /** Processes whose peak RSS is reported, labelled by role. */
  readonly processes: readonly Tracked[]
  stop(): Promise<void>
}

export interface Peer {
  readonly name: string
  start(): Promise<RunningPeer>
}

export interface PeerContext {
  /** Repository root, resolved from the compiled file's location. */
  readonly repoRoot: string
}

function sparseFile(dir: string, name: string): string {
  const path = join(dir, name)
  const fd = openSync(path, 'wx')
  ftruncateSync(fd, volumeBytes)
  closeSync(fd)
  return path
}

/** Stop in reverse start order, then remove the temp dir. */
function stopper(procs: readonly Tracked[], dir: string): () => Promise<void> {
  return async () => {
    for (const p of [...procs].reverse()) await stopTracked(p)
    removeTempDir(dir)
  }
}

/** Start a qemu-nbd on FILE exporting `vol`; returns the process and its URI once ready. */
async function startQemuNbd(name: string, file: string): Promise<{ proc: Tracked; uri: string }> {
  const port = await freePort()
  const args = ['-f', 'raw', '-x', 'vol', '-b', '127.0.0.1', '-p', String(port), '-t']
  const proc = spawnTracked(name, 'qemu-nbd', [...args, '--cache=writeback', file])
  const uri = `nbd://127.0.0.1:${port}/vol`
  try {
    await waitForNbd(uri, [proc])
  } catch (err) {
    await stopTracked(proc)
    throw err
  }
  return { proc, uri }
}

export const qemuNbdPeer: Peer = {
  name: 'qemu-nbd',
  async start() {
    const dir = makeTempDir('qemu-nbd')
    const { proc, uri } = await startQemuNbd('qemu-nbd', sparseFile(dir, 'vol.img'))
    return { uri, processes: [proc], stop: stopper([proc], dir) }
  },
}

export const quorumPeer: Peer = {
  name: 'quorum',
  async start() {
    const dir = makeTempDir('quorum')
    const a = sparseFile(dir, 'a.img')
    const b = sparseFile(dir, 'b.img')
    const replica = await startQemuNbd('quorum-replica(qemu-nbd)', b)
    const port = await freePort()
    const replicaPort = new URL(replica.uri).port
    const daemon = spawnTracked('quorum-primary(qemu-storage-daemon)', 'qemu-storage-daemon', [
      ...['--blockdev', `driver=file,node-name=fa,filename=${a}`],
      ...['--blockdev', 'driver=raw,node-name=ra,file=fa'],
      '--blockdev',
      `driver=nbd,node-name=nb,server.type=inet,server.host=127.0.0.1,server.port=${replicaPort},export=vol`,
      ...['--blockdev', 'driver=raw,node-name=rb,file=nb'],
      '--blockdev',
      'driver=quorum,node-name=q,children.0=ra,children.1=rb,vote-threshold=1',
      ...['--nbd-server', `addr.type=inet,addr.host=127.0.0.1,addr.port=${port}`],
      ...['--export', 'type=nbd,id=e,node-name=q,name=vol,writable=on'],
    ])
    const procs = [replica.proc, daemon]
    const uri = `nbd://127.0.0.1:${port}/vol`
    try {
      await waitForNbd(uri, procs)
    } catch (err) {
      await stopper(procs, dir)()
      throw err
    }
    return { uri, processes: procs, stop: stopper(procs, dir) }
  },
}

/** Single-node duplex: `volume create` offline, then `node` as a daemon. */
export function duplexPeer(ctx: PeerContext): Peer {
  const cli = join(ctx.repoRoot, 'dist', 'src', 'cli', 'main.js')
  return {
    name: 'duplex',
    async start() {
      const dir = makeTempDir('duplex')
      const dataDir = join(dir, 'data')
      const create = await run(process.execPath, [
        ...[cli, 'volume', 'create', 'bench'],
        ...['--size', '1G', '--data-dir', dataDir],
      ])
      if (create.code !== 0) {
        removeTempDir(dir)
        throw new Error(
          `duplex volume create exited ${create.code}:\n${create.stderr}${create.stdout}`,
        )
      }
      const port = await freePort()
      const node = spawnTracked('duplex-node', process.execPath, [
        ...[cli, 'node', '--data-dir', dataDir],
        ...['--listen', `127.0.0.1:${port}`, '--metrics-listen', '127.0.0.1:0'],
      ])
      const uri = `nbd://127.0.0.1:${port}/bench`
      try {
        await waitForNbd(uri, [node])
      } catch (err) {
        await stopper([node], dir)()
        throw err
      }
      return { uri, processes: [node], stop: stopper([node], dir) }
    },
  }
}

/**
 * Two duplex nodes replicating `bench` synchronously; node-a is primary. `tls`: the nodes (and
 * the CLI that waits for the sync) use cluster TLS, with certificates made by `duplex cert`.
 */
export function duplexReplicatedPeer(ctx: PeerContext, tls = false): Peer {
  const cli = join(ctx.repoRoot, 'dist', 'src', 'cli', 'main.js')
  const name = tls ? 'duplex-replicated-tls' : 'duplex-replicated'
  return {
    name,
    async start() {
      const dir = makeTempDir(name)
      const credentials = tls ? await makeCredentials(cli, dir) : undefined
      const credentialsOf = (holder: string): string[] =>
        credentials === undefined ? [] : ['--credentials', join(credentials, holder)]
      const replicationPorts = [await freePort(), await freePort()]
      const names = ['node-a', 'node-b']
      const cluster = join(dir, 'cluster.json')
      writeFileSync(
        cluster,
        JSON.stringify({
          nodes: names.map((name, i) => ({
            name,
            domain: `site-${name.slice(-1)}`,
            replication: `127.0.0.1:${replicationPorts[i] ?? 0}`,
          })),
          volumes: [{ name: 'bench', size: '1G', replicas: names, primary: 'node-a' }],
        }),
      )
      const nbdPorts = [await freePort(), await freePort()]
      const procs = names.map((name, i) =>
        spawnTracked(`duplex-${name}`, process.execPath, [
          ...[cli, 'node', '--name', name, '--data-dir', join(dir, name)],
          ...['--listen', `127.0.0.1:${nbdPorts[i] ?? 0}`, '--metrics-listen', '127.0.0.1:0'],
          ...['--cluster', cluster, ...credentialsOf(name)],
        ]),
      )
      const uri = `nbd://127.0.0.1:${nbdPorts[0] ?? 0}/bench`
      try {
        await waitForNbd(uri, procs)
        await waitForUpToDate(cli, [cluster, ...credentialsOf('admin')], procs)
      } catch (err) {
        await stopper(procs, dir)()
        throw err
      }
      return { uri, processes: procs, stop: stopper(procs, dir) }
    },
  }
}

/** A CA and credentials for node-a, node-b and an admin, in DIR/credentials/NAME. */
async function makeCredentials(cli: string, dir: string): Promise<string> {
  const out = join(dir, 'credentials')
  const duplex = async (args: string[]): Promise<void> => {
    const result = await run(process.execPath, [cli, ...args])
    if (result.code !== 0) throw new Error(`duplex ${args.join(' ')}: ${result.stderr}`)
  }
  const ca = join(out, 'ca')
  await duplex(['cert', 'ca', '--dir', ca])
  for (const [holder, kind] of [
    ['node-a', 'node'],
    ['node-b', 'node'],
    ['admin', 'admin'],
  ]) {
    const address = kind === 'node' ? ['--ip', '127.0.0.1'] : []
    await duplex([
      'cert',
      'issue',
      holder ?? '',
      '--ca-dir',
      ca,
      '--out',
      out,
      '--kind',
      kind ?? '',
      ...address,
    ])
  }
  return out
}

/** Polls `duplex volume status` until both replicas are UpToDate (30 s at most). */
async function waitForUpToDate(cli: string, cluster: string[], procs: Tracked[]): Promise<void> {
  const deadline = Date.now() + 30_000
  let last = ''
  while (Date.now() < deadline) {
    const status = await run(process.execPath, [
      ...[cli, 'volume', 'status', '--output', 'json', '--cluster', ...cluster],
    ])
    last = status.stdout + status.stderr
    if (status.code === 0) {
      const rows = JSON.parse(status.stdout) as { state: string }[]
      if (rows.length === 2 && rows.every((row) => row.state === 'UpToDate')) return
    }
    if (procs.some((p) => p.isExited())) break
    await new Promise((resolve) => setTimeout(resolve, 200))
  }
  throw new Error(`replicas not UpToDate in 30 s:\n${last}`)
}

export const peerNames = [
  'duplex',
  'duplex-replicated',
  'duplex-replicated-tls',
  'qemu-nbd',
  'quorum',
] as const
export type PeerName = (typeof peerNames)[number]

export function makePeer(name: PeerName, ctx: PeerContext): Peer {
  switch (name) {
    case 'duplex':
      return duplexPeer(ctx)
    case 'duplex-replicated':
      return duplexReplicatedPeer(ctx)
    case 'duplex-replicated-tls':
      return duplexReplicatedPeer(ctx, true)
    case 'qemu-nbd':
      return qemuNbdPeer
    case 'quorum':
      return quorumPeer
  }
}
