/**
 * Test helper: runs real `duplex` processes (the built CLI) in a temp directory and tells
 * whether the real NBD clients the tests drive are installed. Under DUPLEX_REQUIRE_TOOLS=1 (CI)
 * a missing tool fails the test instead of skipping it.
 */
import { execFile, spawn } from 'node:child_process'
import type { ChildProcess } from 'node:child_process'
import fs from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import readline from 'node:readline'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import type { Test } from 'tap'

const execFileAsync = promisify(execFile)

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..')
export const cliPath = path.join(repoRoot, 'dist/src/cli/main.js')

export async function tempDir(prefix = 'duplex-test-'): Promise<string> {
  return fs.mkdtemp(path.join(os.tmpdir(), prefix))
}

export interface RunResult {
  code: number
  stdout: string
  stderr: string
}

/** Runs a command to completion; never throws for a non-zero exit. */
export async function run(
  command: string,
  args: string[],
  options: { timeoutMs?: number; input?: string; env?: NodeJS.ProcessEnv } = {},
): Promise<RunResult> {
  try {
    const { stdout, stderr } = await execFileAsync(command, args, {
      timeout: options.timeoutMs ?? 120_000,
      maxBuffer: 64 * 1024 * 1024,
      ...(options.env === undefined ? {} : { env: options.env }),
    })
    return { code: 0, stdout, stderr }
  } catch (error) {
    const e = error as { code?: number | string; stdout?: string; stderr?: string }
    return {
      code: typeof e.code === 'number' ? e.code : -1,
      stdout: e.stdout ?? '',
      stderr: e.stderr ?? String(error),
    }
  }
}

/** Runs the duplex CLI with the given arguments. */
export function duplex(args: string[], timeoutMs?: number): Promise<RunResult> {
  return run(process.execPath, [cliPath, ...args], timeoutMs === undefined ? {} : { timeoutMs })
}

/** The admin CLI against one witness: raw runs, JSON answers, and runs a test expects to pass. */
export interface AdminCli {
  cli: (...args: string[]) => Promise<RunResult>
  /** `ARGS --output json`, parsed; a failure throws with its stderr. */
  json: <T>(...args: string[]) => Promise<T>
  /** Asserts exit code 0 on `t`; returns stdout. */
  ok: (t: Test, ...args: string[]) => Promise<string>
}

/** The admin CLI against `witness`; `extraArgs` go on every command (e.g. --credentials). */
export function adminCli(witness: string, timeoutMs?: number, extraArgs: string[] = []): AdminCli {
  const cli = (...args: string[]): Promise<RunResult> =>
    duplex([...args, '--witness', witness, ...extraArgs], timeoutMs)
  return {
    cli,
    json: async <T>(...args: string[]): Promise<T> => {
      const result = await cli(...args, '--output', 'json')
      if (result.code !== 0) throw new Error(`${args.join(' ')}: ${result.stderr}`)
      return JSON.parse(result.stdout) as T
    },
    ok: async (t: Test, ...args: string[]): Promise<string> => {
      const result = await cli(...args)
      t.equal(result.code, 0, `duplex ${args.join(' ')}: ${result.stderr}`)
      return result.stdout
    },
  }
}

const toolCache = new Map<string, boolean>()

export async function hasTool(tool: string): Promise<boolean> {
  const cached = toolCache.get(tool)
  if (cached !== undefined) return cached
  const found = (await run('sh', ['-c', `command -v ${tool}`])).code === 0
  toolCache.set(tool, found)
  return found
}

/**
 * Returns a skip reason when a tool is missing, or undefined when all are present. Throws under
 * DUPLEX_REQUIRE_TOOLS=1, so CI cannot pass by skipping.
 */
export async function missingTools(tools: string[]): Promise<string | undefined> {
  const missing: string[] = []
  for (const tool of tools) if (!(await hasTool(tool))) missing.push(tool)
  if (missing.length === 0) return undefined
  const reason = `missing tools: ${missing.join(', ')} (install qemu-utils libnbd-bin fio prometheus)`
  if (process.env.DUPLEX_REQUIRE_TOOLS === '1')
    throw new Error(`DUPLEX_REQUIRE_TOOLS=1 and ${reason}`)
  return reason
}

export interface NodeProcess extends DaemonProcess {
  name: string
  dataDir: string
  port: number
  uri(volume: string): string
}

export interface StartNodeOptions {
  name?: string
  dataDir?: string
  volumes?: { name: string; size: string }[]
  extraArgs?: string[]
  metrics?: boolean
  /** Extra environment for the child (e.g. fault hooks), on top of this process's. */
  env?: Record<string, string>
}

/** Creates volumes offline, starts `duplex node` on a free port, and waits for its ready line. */
export async function startNode(options: StartNodeOptions = {}): Promise<NodeProcess> {
  const name = options.name ?? 'node-a'
  const dataDir = options.dataDir ?? (await tempDir())
  for (const volume of options.volumes ?? []) {
    const created = await duplex([
      'volume',
      'create',
      volume.name,
      '--size',
      volume.size,
      '--data-dir',
      dataDir,
    ])
    if (created.code !== 0 && !created.stderr.includes('exists')) {
      throw new Error(`volume create failed: ${created.stderr}`)
    }
  }
  const args = ['node', '--name', name, '--data-dir', dataDir, '--listen', '127.0.0.1:0']
  if (options.metrics === true) args.push('--metrics-listen', '127.0.0.1:0')
  args.push(...(options.extraArgs ?? []))
  const daemon = await spawnDaemon('duplex node', args, options.env)
  const port = Number(/nbd:\/\/[^\s]*:(\d+)/.exec(daemon.ready)?.[1])
  return {
    ...daemon,
    name,
    dataDir,
    port,
    uri: (volume) => `nbd://127.0.0.1:${port}/${volume}`,
  }
}

/** A running daemon process started by the helpers below. */
export interface DaemonProcess {
  child: ChildProcess
  /** Its ready line. */
  ready: string
  metricsPort: number | undefined
  stderr(): string
  /** SIGTERM and wait for exit; returns the exit code (null if killed by a signal). */
  stop(): Promise<number | null>
  /** SIGKILL and wait. */
  kill(): Promise<void>
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>
}

/** Spawns `duplex ARGS` and waits for its ready line (the first line on stdout). */
export async function spawnDaemon(
  what: string,
  args: string[],
  env?: Record<string, string>,
): Promise<DaemonProcess> {
  const child = spawn(process.execPath, [cliPath, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    ...(env === undefined ? {} : { env: { ...process.env, ...env } }),
  })
  let stderr = ''
  child.stderr.setEncoding('utf8')
  child.stderr.on('data', (text: string) => {
    stderr += text
  })
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('exit', (code, signal) => {
      resolve({ code, signal })
    })
  })
  const lines = readline.createInterface({ input: child.stdout })
  const ready = await Promise.race([
    new Promise<string>((resolve) => lines.once('line', resolve)),
    exited.then(({ code }) => {
      throw new Error(`${what} exited with ${code ?? 'signal'} before ready:\n${stderr}`)
    }),
    new Promise<never>((_, reject) =>
      setTimeout(() => {
        reject(new Error(`${what} not ready after 30 s:\n${stderr}`))
      }, 30_000).unref(),
    ),
  ])
  const metricsMatch = /metrics http:\/\/[^\s]*:(\d+)/.exec(ready)
  return {
    child,
    ready,
    metricsPort: metricsMatch ? Number(metricsMatch[1]) : undefined,
    stderr: () => stderr,
    exited,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM')
      return (await exited).code
    },
    async kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
      await exited
    },
  }
}

export interface WitnessProcess extends DaemonProcess {
  dataDir: string
  /** HOST:PORT of its gRPC service. */
  address: string
}

/** Starts `duplex witness` on a free port (or `listen`), with metrics, and waits until it serves. */
export async function startWitness(
  options: { dataDir?: string; listen?: string; extraArgs?: string[] } = {},
): Promise<WitnessProcess> {
  const dataDir = options.dataDir ?? (await tempDir('duplex-witness-'))
  const args = ['witness', '--data-dir', dataDir, '--listen', options.listen ?? '127.0.0.1:0']
  args.push('--metrics-listen', '127.0.0.1:0', ...(options.extraArgs ?? []))
  const daemon = await spawnDaemon('duplex witness', args)
  const address = / witness (\S+)/.exec(daemon.ready)?.[1]
  if (address === undefined) throw new Error(`unexpected ready line: ${daemon.ready}`)
  return { ...daemon, dataDir, address }
}

/** A port with `count` consecutive free ports starting at it (best effort: another process may race us). */
export async function freePorts(count: number): Promise<number> {
  const net = await import('node:net')
  const canBind = (port: number): Promise<boolean> =>
    new Promise((resolve) => {
      const server = net.createServer()
      server.once('error', () => {
        resolve(false)
      })
      server.listen({ host: '127.0.0.1', port }, () => {
        server.close(() => {
          resolve(true)
        })
      })
    })
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = 20000 + Math.floor(Math.random() * 30000)
    let ok = true
    for (let i = 0; i < count && ok; i++) ok = await canBind(base + i)
    if (ok) return base
  }
  throw new Error('no free ports found')
}

/** Polls `probe` until it returns a value (a throw counts as "not yet"), or fails after `timeoutMs`. */
export async function until<T>(
  what: string,
  probe: () => Promise<T | undefined>,
  timeoutMs = 30_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = await probe().catch(() => undefined)
    if (value !== undefined) return value
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 200))
  }
}

/** What `promise` rejected with; fails if it resolved. */
export async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise
  } catch (error) {
    return error
  }
  throw new Error('expected a rejection')
}
