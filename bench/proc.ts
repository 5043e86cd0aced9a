/**
 * Child processes and temp dirs for the benchmark harness, with cleanup that always runs.
 *
 * Every daemon the harness starts (qemu-nbd, qemu-storage-daemon, duplex nodes, fio) goes through
 * `spawnTracked`, and every scratch directory through `makeTempDir`, so that one registry can kill
 * and remove them on normal exit, on SIGINT/SIGTERM, and on an uncaught error. The registry is
 * process-wide on purpose: a benchmark that leaks a 1 GiB qemu-nbd export is worse than a global.
 */
import { spawn, execFile } from 'node:child_process'
import type { ChildProcess } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createServer } from 'node:net'

/** How much of a child's stderr/stdout we keep for error messages. */
const outputTailBytesMax = 8192

/** A started child with the tail of its output, for readiness errors. */
export interface Tracked {
  readonly name: string
  readonly child: ChildProcess
  readonly pid: number
  /** Last bytes of stdout+stderr interleaved. */
  output(): string
  /** Resolves once the child has exited (immediately if it already has). */
  exited(): Promise<void>
  /** True once the child has exited. */
  isExited(): boolean
}

const children = new Set<Tracked>()
const tempDirs = new Set<string>()

/** Spawn a child, capture the tail of its output, and register it for cleanup. */
export function spawnTracked(name: string, cmd: string, args: readonly string[]): Tracked {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] })
  let tail = ''
  const append = (chunk: Buffer): void => {
    tail = (tail + chunk.toString('utf8')).slice(-outputTailBytesMax)
  }
  child.stdout.on('data', append)
  child.stderr.on('data', append)
  let done = false
  const exitPromise = new Promise<void>((resolve) => {
    child.on('exit', () => {
      done = true
      resolve()
    })
    child.on('error', (err) => {
      append(Buffer.from(`spawn error: ${err.message}\n`))
      done = true
      resolve()
    })
  })
  if (child.pid === undefined) {
    throw new Error(`could not spawn ${cmd}`)
  }
  const tracked: Tracked = {
    name,
    child,
    pid: child.pid,
    output: () => tail,
    exited: () => exitPromise,
    isExited: () => done,
  }
  children.add(tracked)
  void exitPromise.then(() => children.delete(tracked))
  return tracked
}

/** SIGTERM, then SIGKILL after `graceMs` if it is still alive. */
export async function stopTracked(t: Tracked, graceMs = 5000): Promise<void> {
  if (t.isExited()) return
  t.child.kill('SIGTERM')
  const timer = setTimeout(() => t.child.kill('SIGKILL'), graceMs)
  await t.exited()
  clearTimeout(timer)
}

/** A fresh temp dir, removed at exit. */
export function makeTempDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), `duplex-bench-${prefix}-`))
  tempDirs.add(dir)
  return dir
}

export function removeTempDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true })
  tempDirs.delete(dir)
}

/** Synchronous last resort: SIGKILL every child still alive and remove every temp dir. */
function cleanupSync(): void {
  for (const t of children) {
    if (!t.isExited()) t.child.kill('SIGKILL')
  }
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true })
  tempDirs.clear()
}

/** Install exit/signal handlers once; call at the start of main. */
export function installCleanupHandlers(): void {
  process.on('exit', cleanupSync)
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(sig, () => {
      process.stderr.write(`\nbench: ${sig}, stopping children\n`)
      cleanupSync()
      process.exit(130)
    })
  }
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer()
    srv.on('error', reject)
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address()
      if (addr === null || typeof addr === 'string') {
        reject(new Error('no port'))
        return
      }
      srv.close(() => {
        resolve(addr.port)
      })
    })
  })
}

export interface ExecResult {
  readonly code: number
  readonly stdout: string
  readonly stderr: string
}

/** Run a command to completion; never rejects, the exit code says what happened. */
export async function run(
  cmd: string,
  args: readonly string[],
  timeoutMs = 60_000,
): Promise<ExecResult> {
  return new Promise((resolve) => {
    execFile(
      cmd,
      args,
      { timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024, killSignal: 'SIGKILL' },
      (err, stdout, stderr) => {
        let code = 0
        if (err !== null) code = typeof err.code === 'number' ? err.code : -1
        resolve({ code, stdout, stderr: err !== null && stderr === '' ? err.message : stderr })
      },
    )
  })
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms))

/**
 * Poll `nbdinfo --size URI` until the export answers: that proves the listener is up and the
 * export name resolves, which a bare TCP connect would not.
 */
export async function waitForNbd(uri: string, procs: readonly Tracked[], timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs
  let last = ''
  for (;;) {
    const dead = procs.find((p) => p.isExited())
    if (dead !== undefined) {
      throw new Error(
        `${dead.name} (pid ${dead.pid}) exited before ${uri} was ready; its output:\n${dead.output()}`,
      )
    }
    const r = await run('nbdinfo', ['--size', uri], 5000)
    if (r.code === 0) return
    last = r.stderr.trim()
    if (Date.now() > deadline) {
      const outs = procs.map((p) => `--- ${p.name} (pid ${p.pid}) ---\n${p.output()}`).join('\n')
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${uri} (${last})\n${outs}`)
    }
    await sleep(100)
  }
}

/** Peak resident set size (VmHWM) of a live process in bytes, or null if unreadable. */
export function peakRssBytes(pid: number): number | null {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8')
    const m = /^VmHWM:\s+(\d+)\s+kB/m.exec(status)
    return m?.[1] === undefined ? null : Number(m[1]) * 1024
  } catch {
    return null
  }
}
