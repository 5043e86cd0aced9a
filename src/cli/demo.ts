/**
 * `duplex demo` (what `npm start` runs): a local cluster on 127.0.0.1 for trying duplex out.
 * Today one node, `node-a`, serving the 1 GiB volume `demo`; it grows into the three-domain
 * cluster as replication and the witness land.
 *
 * Output contract, relied on by users and scripts (keep it stable): one line per process,
 * `NAME pid PID nbd://HOST:PORT/VOLUME metrics http://HOST:PORT/metrics`, then hints. State lives
 * in --dir and is reused on the next run. Ctrl-C or SIGTERM stops every process cleanly.
 */
import { spawn } from 'node:child_process'
import type { ChildProcess } from 'node:child_process'
import path from 'node:path'
import readline from 'node:readline'
import { fileURLToPath } from 'node:url'
import { DuplexError } from '../core/errors.js'
import { GiB } from '../core/units.js'
import { NodeStore } from '../replica/store.js'

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

export async function runDemo(args: DemoArgs): Promise<number> {
  const nodeDir = path.resolve(args.dir, 'node-a')
  await ensureVolume(nodeDir)
  const started = await startProcess('node-a', [
    'node',
    '--name',
    'node-a',
    '--data-dir',
    nodeDir,
    '--listen',
    `127.0.0.1:${args.port}`,
    '--metrics-listen',
    `127.0.0.1:${args.port + 1}`,
  ])
  const metrics = / metrics (\S+)/.exec(started.readyLine)?.[1]
  const uri = `nbd://127.0.0.1:${args.port}/${DEMO_VOLUME}`
  process.stdout.write(
    `node-a pid ${started.child.pid ?? '?'} ${uri}${metrics === undefined ? '' : ` metrics ${metrics}`}\n`,
  )
  process.stdout.write(
    `\nduplex demo is running (state in ${path.resolve(args.dir)}). Try:\n` +
      `  qemu-img info ${uri}\n` +
      `  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' ${uri}\n` +
      `  nbdinfo --map ${uri}\n` +
      `Press Ctrl-C to stop.\n`,
  )
  return supervise([started])
}

async function ensureVolume(nodeDir: string): Promise<void> {
  const store = await NodeStore.open(nodeDir)
  try {
    if (store.get(DEMO_VOLUME) === undefined) await store.create(DEMO_VOLUME, GiB)
  } finally {
    await store.close()
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
