/**
 * `duplex demo` (what `npm start` runs): a local cluster on 127.0.0.1 for trying duplex out. Two
 * nodes, `node-a` in domain `site-a` and `node-b` in domain `site-b`, with the 1 GiB volume `demo`
 * replicated between them (node-a primary at first), and the witness (domain `site-w`) that
 * arbitrates when one of them fails.
 *
 * Ports from --port P: node-a NBD P, metrics P+1, replication P+2; node-b P+3, P+4, P+5; the
 * witness P+6 (gRPC) and P+7 (metrics).
 *
 * Output contract, relied on by users and scripts (keep it stable): one line per process,
 * `NAME pid PID nbd://HOST:PORT/VOLUME metrics http://HOST:PORT/metrics` for each node, then
 * `witness pid PID witness HOST:PORT metrics http://HOST:PORT/metrics`, then hints. State lives
 * in --dir (one directory per process and `cluster.json`) and is reused on the next run. Ctrl-C
 * or SIGTERM stops every process cleanly.
 */
import { spawn } from 'node:child_process'
import type { ChildProcess } from 'node:child_process'
import { mkdir, writeFile } from 'node:fs/promises'
import path from 'node:path'
import readline from 'node:readline'
import { fileURLToPath } from 'node:url'
import { DuplexError } from '../core/errors.js'

export interface DemoArgs {
  dir: string
  port: number
}

const DEMO_VOLUME = 'demo'
const READY_TIMEOUT_MS = 30_000

interface Started {
  name: string
  child: ChildProcess
  readyLine: string
}

interface DemoNode {
  name: string
  domain: string
  nbdPort: number
  metricsPort: number
  replicationPort: number
}

function demoNodes(port: number): DemoNode[] {
  return [
    {
      name: 'node-a',
      domain: 'site-a',
      nbdPort: port,
      metricsPort: port + 1,
      replicationPort: port + 2,
    },
    {
      name: 'node-b',
      domain: 'site-b',
      nbdPort: port + 3,
      metricsPort: port + 4,
      replicationPort: port + 5,
    },
  ]
}

export async function runDemo(args: DemoArgs): Promise<number> {
  const dir = path.resolve(args.dir)
  const nodes = demoNodes(args.port)
  const witnessAddress = `127.0.0.1:${args.port + 6}`
  const witnessMetrics = `127.0.0.1:${args.port + 7}`
  const clusterPath = path.join(dir, 'cluster.json')
  await writeCluster(clusterPath, nodes, witnessAddress)
  // The witness first: each node asks it what changed while it was away before it serves.
  const witness = await startProcess('witness', [
    'witness',
    '--name',
    'witness',
    '--data-dir',
    path.join(dir, 'witness'),
    '--listen',
    witnessAddress,
    '--metrics-listen',
    witnessMetrics,
  ])
  // Both nodes start together: a new replica waits for its peer to learn whether it holds data.
  const startedOrFailed = await Promise.allSettled(
    nodes.map((node) =>
      startProcess(node.name, [
        'node',
        '--name',
        node.name,
        '--data-dir',
        path.join(dir, node.name),
        '--listen',
        `127.0.0.1:${node.nbdPort}`,
        '--metrics-listen',
        `127.0.0.1:${node.metricsPort}`,
        '--cluster',
        clusterPath,
      ]),
    ),
  )
  const started = startedOrFailed.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []))
  const failed = startedOrFailed.find((r) => r.status === 'rejected')
  if (failed !== undefined) {
    for (const p of [...started, witness]) p.child.kill('SIGTERM')
    throw failed.reason
  }
  for (const [index, node] of nodes.entries()) {
    const process_ = started[index]
    if (process_ === undefined) continue
    const metrics = / metrics (\S+)/.exec(process_.readyLine)?.[1]
    process.stdout.write(
      `${node.name} pid ${process_.child.pid ?? '?'} nbd://127.0.0.1:${node.nbdPort}/${DEMO_VOLUME}` +
        `${metrics === undefined ? '' : ` metrics ${metrics}`}\n`,
    )
  }
  process.stdout.write(
    `witness pid ${witness.child.pid ?? '?'} witness ${witnessAddress} metrics http://${witnessMetrics}/metrics\n`,
  )
  const [a, b] = nodes.map((node) => `nbd://127.0.0.1:${node.nbdPort}/${DEMO_VOLUME}`)
  const cluster = path.relative(process.cwd(), clusterPath) || clusterPath
  process.stdout.write(
    `\nduplex demo is running (state in ${dir}). Every write reaches both nodes. Try:\n` +
      `  qemu-img info ${a}\n` +
      `  qemu-io -f raw -c 'write -P 0xab 0 1M' ${a}\n` +
      `  qemu-io -f raw -c 'read -P 0xab 0 1M' ${b}\n` +
      `  duplex volume status --cluster ${cluster}\n` +
      `  duplex volume promote demo --node node-b --cluster ${cluster}\n` +
      `Press Ctrl-C to stop.\n`,
  )
  return supervise([...started, witness])
}

async function writeCluster(file: string, nodes: DemoNode[], witness: string): Promise<void> {
  const config = {
    witness,
    nodes: nodes.map((node) => ({
      name: node.name,
      domain: node.domain,
      replication: `127.0.0.1:${node.replicationPort}`,
    })),
    volumes: [{ name: DEMO_VOLUME, size: '1G', replicas: ['node-a', 'node-b'], primary: 'node-a' }],
  }
  await mkdir(path.dirname(file), { recursive: true })
  await writeFile(file, JSON.stringify(config, null, 2) + '\n')
}

function cliPath(): string {
  return path.join(path.dirname(fileURLToPath(import.meta.url)), 'main.js')
}

async function startProcess(name: string, argv: string[]): Promise<Started> {
  // Each child gets its own process group, so a Ctrl-C in the terminal reaches only the demo,
  // which then stops the children one clean SIGTERM each. The IPC channel is the children's
  // lifeline: if the demo dies, they see it close and stop themselves (exit-with-parent).
  const child = spawn(process.execPath, [cliPath(), ...argv], {
    stdio: ['ignore', 'pipe', 'inherit', 'ipc'],
    detached: true,
  })
  if (child.stdout === null) throw new DuplexError('IO_ERROR', `${name}: no stdout pipe`)
  const lines = readline.createInterface({ input: child.stdout })
  const readyLine = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGTERM')
      reject(new DuplexError('IO_ERROR', `${name} did not become ready in ${READY_TIMEOUT_MS} ms`))
    }, READY_TIMEOUT_MS)
    lines.once('line', (line) => {
      clearTimeout(timer)
      resolve(line)
    })
    child.once('exit', (code) => {
      clearTimeout(timer)
      reject(
        new DuplexError(
          'IO_ERROR',
          `${name} exited with code ${code ?? 'null'} before it was ready`,
        ),
      )
    })
  })
  lines.on('line', (line) => process.stdout.write(`${name}: ${line}\n`))
  return { name, child, readyLine }
}

/** Waits for a signal (then stops every child) or for a child to die (then stops the rest). */
function supervise(processes: Started[]): Promise<number> {
  return new Promise((resolve) => {
    let stopping = false
    let exitCode = 0
    let running = processes.length
    const stopAll = (): void => {
      if (stopping) return
      stopping = true
      for (const p of processes) if (p.child.exitCode === null) p.child.kill('SIGTERM')
    }
    for (const p of processes) {
      p.child.on('exit', (code, signal) => {
        running -= 1
        if (!stopping) {
          process.stderr.write(
            `duplex demo: ${p.name} exited (${code ?? signal ?? '?'}); stopping\n`,
          )
          exitCode = 1
          stopAll()
        } else if (code !== 0) {
          exitCode = 1
        }
        if (running === 0) resolve(exitCode)
      })
    }
    process.on('SIGINT', stopAll)
    process.on('SIGTERM', stopAll)
  })
}
