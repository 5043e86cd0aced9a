/**
 * Test helper: a replicated pair of real `duplex node` processes (node-a in site-a, node-b in
 * site-b) sharing one cluster file that places a single volume `vol` on both, node-a primary.
 * `startPair` returns once `duplex volume status` reports both replicas UpToDate.
 */
import fs from 'node:fs/promises'
import path from 'node:path'
import { duplex, freePorts, startNode, startWitness, tempDir } from './node-process.js'
import type { NodeProcess, WitnessProcess } from './node-process.js'

export type PairNode = 'a' | 'b'

/** One row of `duplex volume status --output json`. */
export interface StatusRow {
  volume: string
  node: string
  domain: string
  sizeBytes: number
  role: 'primary' | 'secondary' | 'unknown'
  epoch?: number
  /** 'UpToDate', 'Inconsistent' or 'unreachable' (or another state a node reports). */
  state: string
  error?: string
}

export interface PairOptions {
  /** Size of `vol` as the cluster file spells it; 64M by default. */
  volumeSize?: string
  /** Extra environment for both node processes. */
  env?: Record<string, string>
  /** Extra environment for one node only (on top of `env`), e.g. a fault hook on the primary. */
  nodeEnv?: Partial<Record<PairNode, Record<string, string>>>
  /** The volume's `followTheWriter` entry in the cluster file; left out when undefined. */
  followTheWriter?: unknown
  /** How long to wait for both replicas to be UpToDate; 20 s by default. */
  upToDateTimeoutMs?: number
  /** Run a witness process too, named in the cluster file (failover on). */
  witness?: boolean
  /** The volume's `onLostQuorum` entry; left out when undefined. */
  onLostQuorum?: 'error' | 'suspend'
  /** The volume's `access` entry (who may open it over NBD); left out when undefined. */
  access?: unknown
  /** Extra command-line arguments for one node, e.g. its TLS settings. */
  nodeArgs?: Partial<Record<PairNode, string[]>>
}

export interface Pair {
  readonly a: NodeProcess
  readonly b: NodeProcess
  /** The witness, with `witness: true`. */
  readonly witness: WitnessProcess | undefined
  /** Starts the witness again (same data directory and address) after it was stopped. */
  restartWitness(): Promise<WitnessProcess>
  /** Directory holding the cluster file and both data directories. */
  readonly dir: string
  readonly clusterFile: string
  /** `duplex volume status --output json` rows (throws if the command fails). */
  status(): Promise<StatusRow[]>
  /** Polls status until both replicas of `vol` are UpToDate; returns the last rows. */
  waitUpToDate(timeoutMs?: number): Promise<StatusRow[]>
  /**
   * Stops the node (SIGTERM, SIGKILL after 10 s) if it still runs, and starts it again with the
   * same data directory, arguments and environment. Does not wait for UpToDate.
   */
  restart(which: PairNode): Promise<NodeProcess>
  /** The one `.data` file in the node's data directory (the node's replica of `vol`). */
  dataFile(which: PairNode | NodeProcess): Promise<string>
  /** Stops both nodes (resuming a stopped one first); returns their exit codes. */
  stop(): Promise<Record<PairNode, number | null>>
  /** stop(), then removes the pair's directory. For teardown. */
  destroy(): Promise<void>
}

export const nodeNames: Record<PairNode, string> = { a: 'node-a', b: 'node-b' }

function isRunning(node: NodeProcess): boolean {
  return node.child.exitCode === null && node.child.signalCode === null
}

/** SIGTERM and wait; SIGKILL if it has not exited after `graceMs`. */
async function stopNode(node: NodeProcess, graceMs = 10_000): Promise<number | null> {
  if (!isRunning(node)) return (await node.exited).code
  node.child.kill('SIGCONT') // a SIGSTOPped node cannot act on SIGTERM
  let timer: NodeJS.Timeout | undefined
  const code = await Promise.race([
    node.stop(),
    new Promise<'timeout'>((resolve) => {
      timer = setTimeout(() => {
        resolve('timeout')
      }, graceMs)
    }),
  ])
  clearTimeout(timer)
  if (code !== 'timeout') return code
  await node.kill()
  return (await node.exited).code
}

export async function startPair(options: PairOptions = {}): Promise<Pair> {
  const dir = await tempDir('duplex-pair-')
  const base = await freePorts(2)
  const clusterFile = path.join(dir, 'cluster.json')
  const volume: Record<string, unknown> = {
    name: 'vol',
    size: options.volumeSize ?? '64M',
    replicas: ['node-a', 'node-b'],
    primary: 'node-a',
  }
  if (options.followTheWriter !== undefined) volume['followTheWriter'] = options.followTheWriter
  if (options.onLostQuorum !== undefined) volume['onLostQuorum'] = options.onLostQuorum
  if (options.access !== undefined) volume['access'] = options.access
  let witness =
    options.witness === true
      ? await startWitness({ dataDir: path.join(dir, 'w'), extraArgs: ['--name', 'witness'] })
      : undefined
  const cluster = {
    ...(witness === undefined ? {} : { witness: witness.address }),
    nodes: [
      { name: 'node-a', domain: 'site-a', replication: `127.0.0.1:${base}` },
      { name: 'node-b', domain: 'site-b', replication: `127.0.0.1:${base + 1}` },
    ],
    volumes: [volume],
  }
  await fs.writeFile(clusterFile, JSON.stringify(cluster, null, 2) + '\n')

  const start = (which: PairNode): Promise<NodeProcess> => {
    const env = { ...options.env, ...options.nodeEnv?.[which] }
    return startNode({
      name: nodeNames[which],
      dataDir: path.join(dir, which),
      metrics: true,
      extraArgs: ['--cluster', clusterFile, ...(options.nodeArgs?.[which] ?? [])],
      ...(Object.keys(env).length === 0 ? {} : { env }),
    })
  }

  // Each new replica waits for its peer: start both at once.
  const started = await Promise.allSettled([start('a'), start('b')])
  const nodes: Partial<Record<PairNode, NodeProcess>> = {}
  const failures: string[] = []
  for (const [i, which] of (['a', 'b'] as const).entries()) {
    const result = started[i]
    if (result?.status === 'fulfilled') nodes[which] = result.value
    else failures.push(`${nodeNames[which]}: ${String(result?.reason)}`)
  }
  if (failures.length > 0) {
    await Promise.all(Object.values(nodes).map((node) => stopNode(node)))
    await witness?.kill()
    await fs.rm(dir, { recursive: true, force: true })
    throw new Error(`starting the pair failed:\n${failures.join('\n')}`)
  }
  const current = nodes as Record<PairNode, NodeProcess>

  const status = async (): Promise<StatusRow[]> => {
    const r = await duplex(['volume', 'status', '--cluster', clusterFile, '--output', 'json'])
    if (r.code !== 0) throw new Error(`volume status exited ${r.code}: ${r.stderr}`)
    return JSON.parse(r.stdout) as StatusRow[]
  }

  const pair: Pair = {
    get a() {
      return current.a
    },
    get b() {
      return current.b
    },
    get witness() {
      return witness
    },
    async restartWitness() {
      if (witness === undefined) throw new Error('this pair has no witness')
      await witness.stop()
      witness = await startWitness({
        dataDir: witness.dataDir,
        listen: witness.address,
        extraArgs: ['--name', 'witness'],
      })
      return witness
    },
    dir,
    clusterFile,
    status,
    async waitUpToDate(timeoutMs = options.upToDateTimeoutMs ?? 20_000) {
      const deadline = Date.now() + timeoutMs
      let last = 'no status yet'
      for (;;) {
        try {
          const rows = await status()
          last = JSON.stringify(rows)
          const vol = rows.filter((row) => row.volume === 'vol')
          if (vol.length === 2 && vol.every((row) => row.state === 'UpToDate')) return rows
        } catch (error) {
          last = String(error)
        }
        if (Date.now() > deadline) {
          throw new Error(
            `both replicas not UpToDate after ${timeoutMs} ms; last status: ${last}\n` +
              `--- node-a stderr ---\n${current.a.stderr()}\n` +
              `--- node-b stderr ---\n${current.b.stderr()}`,
          )
        }
        await new Promise((resolve) => setTimeout(resolve, 200))
      }
    },
    async restart(which) {
      await stopNode(current[which])
      current[which] = await start(which)
      return current[which]
    },
    async dataFile(which) {
      const dataDir = typeof which === 'string' ? current[which].dataDir : which.dataDir
      const volumes = path.join(dataDir, 'volumes')
      const files = (await fs.readdir(volumes)).filter((name) => name.endsWith('.data'))
      if (files.length !== 1 || files[0] === undefined) {
        throw new Error(`expected one .data file in ${volumes}, found: ${files.join(', ')}`)
      }
      return path.join(volumes, files[0])
    },
    async stop() {
      const [a, b] = await Promise.all([stopNode(current.a), stopNode(current.b)])
      await witness?.stop()
      return { a, b }
    },
    async destroy() {
      await pair.stop()
      await fs.rm(dir, { recursive: true, force: true })
    },
  }

  try {
    await pair.waitUpToDate()
  } catch (error) {
    await pair.destroy()
    throw error
  }
  return pair
}
