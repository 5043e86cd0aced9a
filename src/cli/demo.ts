/**
 * `duplex demo` (what `npm start` runs): a local cluster on 127.0.0.1 for trying duplex out, built
 * the way an admin builds one: the witness (domain `site-w`) starts first and keeps the catalog;
 * the demo adds the domains `site-a`, `site-b` and `site-w` and the nodes `node-a` and `node-b`
 * through its Admin service, starts both nodes following the catalog (`--witness`), and creates
 * the 1 GiB volume `demo`, which placement puts on node-a (preferred site-a, primary) and node-b.
 *
 * Ports from --port P: node-a NBD P, metrics P+1, replication P+2; node-b P+3, P+4, P+5; the
 * witness P+6 (gRPC) and P+7 (metrics).
 *
 * Output contract, relied on by users and scripts (keep it stable): one line per process,
 * `NAME pid PID nbd://HOST:PORT/VOLUME metrics http://HOST:PORT/metrics` for each node, then
 * `witness pid PID witness HOST:PORT metrics http://HOST:PORT/metrics`, then hints; the lines are
 * printed once the demo volume is served by both nodes. State lives in --dir (one directory per
 * process; the catalog in the witness's) and is reused on the next run: every step is idempotent.
 * Ctrl-C or SIGTERM stops every process cleanly.
 *
 * Cluster TLS needs no setup: on its first run the demo makes a throwaway CA and credentials for
 * the witness, both nodes and an admin in --dir/credentials (with openssl; without openssl it
 * runs in plaintext and says so), and the hints say how the CLI uses them.
 */
import { spawn } from 'node:child_process'
import type { ChildProcess } from 'node:child_process'
import { access } from 'node:fs/promises'
import path from 'node:path'
import readline from 'node:readline'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import { DuplexError, errorMessage, isDuplexError } from '../core/errors.js'
import { GiB } from '../core/units.js'
import { AdminClient } from '../witness/admin-service.js'
import type { CatalogCommand } from '../witness/catalog.js'
import { defaultWitness } from './catalog-command.js'
import { issueCert, makeCa } from './cert-command.js'
import type { CertKind } from './cert-command.js'
import { createLogger } from '../core/log.js'
import { credentialFiles, TlsCredentials } from '../core/tls.js'

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
  const credentials = await demoCredentials(dir, nodes)
  const credentialsOf = (name: string): string[] =>
    credentials === undefined ? [] : ['--credentials', path.join(credentials, name)]
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
    ...credentialsOf('witness'),
  ])
  const adminTls =
    credentials === undefined
      ? undefined
      : new TlsCredentials({
          files: credentialFiles(path.join(credentials, 'admin')),
          log: createLogger('demo'),
          reloadMs: 0,
        })
  const admin = new AdminClient(
    witnessAddress,
    adminTls === undefined ? {} : { credentials: adminTls.channelCredentials({ role: 'witness' }) },
  )
  const started: Started[] = [witness]
  try {
    await buildCatalog(admin, nodes, dir)
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
          '--witness',
          witnessAddress,
          ...credentialsOf(node.name),
        ]),
      ),
    )
    for (const result of startedOrFailed) {
      if (result.status === 'fulfilled') started.push(result.value)
    }
    const failed = startedOrFailed.find((r) => r.status === 'rejected')
    if (failed !== undefined) throw failed.reason
    await createDemoVolume(admin)
  } catch (error) {
    for (const p of started) p.child.kill('SIGTERM')
    throw error
  } finally {
    admin.close()
    adminTls?.close()
  }
  for (const node of nodes) {
    const process_ = started.find((p) => p.name === node.name)
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
  const witnessFlag = witnessAddress === defaultWitness ? '' : ` --witness ${witnessAddress}`
  const tlsHint =
    credentials === undefined
      ? 'The cluster traffic is in the clear (no openssl to make certificates with).\n'
      : `The cluster traffic is mutual TLS, with throwaway certificates in ${credentials}.\n` +
        `For the CLI: export DUPLEX_CREDENTIALS=${path.join(credentials, 'admin')}\n`
  process.stdout.write(
    `\nduplex demo is running (state in ${dir}). Every write reaches both nodes.\n` +
      tlsHint +
      `Try:\n` +
      `  qemu-img info ${a}\n` +
      `  qemu-io -f raw -c 'write -P 0xab 0 1M' ${a}\n` +
      `  qemu-io -f raw -c 'read -P 0xab 0 1M' ${b}\n` +
      `  duplex status${witnessFlag}\n` +
      `  duplex volume create vm1 --size 10G${witnessFlag}\n` +
      `  duplex volume promote demo --node node-b${witnessFlag}\n` +
      `Press Ctrl-C to stop.\n`,
  )
  return supervise(started)
}

/** Domains and nodes, as an admin would add them; on a later run they exist already. */
async function buildCatalog(admin: AdminClient, nodes: DemoNode[], dir: string): Promise<void> {
  const commands: CatalogCommand[] = [
    { type: 'addDomain', name: 'site-a', kind: 'data' },
    { type: 'addDomain', name: 'site-b', kind: 'data' },
    { type: 'addDomain', name: 'site-w', kind: 'witness' },
    ...nodes.map((node): CatalogCommand => ({
      type: 'addNode',
      name: node.name,
      domain: node.domain,
      replication: `127.0.0.1:${node.replicationPort}`,
    })),
  ]
  for (const command of commands) {
    try {
      await retryUnavailable(() => admin.change(command))
    } catch (error) {
      if (isDuplexError(error, 'ALREADY_EXISTS')) {
        throw new DuplexError(
          'FAILED_PRECONDITION',
          `${dir} holds a demo made with other settings (${errorMessage(error)}); ` +
            `run with the same --port, or with another --dir`,
        )
      }
      throw error
    }
  }
}

/** Creates the demo volume (once) and waits until both replicas serve it, in sync. */
async function createDemoVolume(admin: AdminClient): Promise<void> {
  // The nodes must be up (registered, heartbeating) for placement to pick them.
  const deadline = Date.now() + READY_TIMEOUT_MS
  for (;;) {
    try {
      await admin.change({
        type: 'createVolume',
        name: DEMO_VOLUME,
        sizeBytes: GiB,
        preferredDomain: 'site-a',
      })
      break
    } catch (error) {
      if (Date.now() > deadline) throw error
      await sleep(200)
    }
  }
  for (;;) {
    const status = await admin.clusterStatus()
    if (status.volumes.some((record) => record.volume === DEMO_VOLUME && record.inSync)) return
    if (Date.now() > deadline) {
      throw new DuplexError(
        'IO_ERROR',
        `the demo volume was not in sync on both nodes within ${READY_TIMEOUT_MS} ms`,
      )
    }
    await sleep(200)
  }
}

async function retryUnavailable<T>(work: () => Promise<T>): Promise<T> {
  const deadline = Date.now() + READY_TIMEOUT_MS
  for (;;) {
    try {
      return await work()
    } catch (error) {
      if (!isDuplexError(error, 'UNAVAILABLE') || Date.now() > deadline) throw error
      await sleep(200)
    }
  }
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

/**
 * The demo's throwaway credentials in DIR/credentials (made on the first run): a CA, and the
 * credential directories `witness`, `node-a`, `node-b` and `admin`. Undefined without openssl.
 */
async function demoCredentials(dir: string, nodes: DemoNode[]): Promise<string | undefined> {
  const credentials = path.join(dir, 'credentials')
  const quiet = (): void => undefined
  const made = path.join(credentials, 'admin', 'key.pem')
  if (await exists(made)) return credentials
  try {
    const caDir = path.join(credentials, 'ca')
    await makeCa(caDir, 'duplex-demo-ca', 3650, quiet)
    const issue = (name: string, kind: CertKind): Promise<void> =>
      issueCert(
        name,
        {
          caDir,
          out: credentials,
          kind,
          ips: kind === 'admin' ? [] : ['127.0.0.1'],
          dnsNames: [],
          days: 3650,
        },
        quiet,
      )
    await issue('witness', 'witness')
    for (const node of nodes) await issue(node.name, 'node')
    await issue('admin', 'admin')
    return credentials
  } catch (error) {
    if (isDuplexError(error, 'UNAVAILABLE')) {
      process.stderr.write(`duplex demo: ${errorMessage(error)}; running without TLS\n`)
      return undefined
    }
    throw error
  }
}

async function exists(file: string): Promise<boolean> {
  try {
    await access(file)
    return true
  } catch {
    return false
  }
}
