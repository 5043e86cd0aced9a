/**
 * `npm run bench`: run identical fio jobs over NBD against duplex and its peers, side by side on
 * this machine, and write a JSON + markdown report to bench/results/.
 *
 * Order of work: start every selected peer (each on free 127.0.0.1 ports, fresh temp dir, 1 GiB
 * sparse volume); for each job, run it on every peer back to back, reversing the peer order on
 * every other job to spread drift; fill each volume sequentially right before the first job that
 * reads; read peak RSS; stop everything. A peer that fails to start or a job that fails is
 * recorded as an error and the run goes on; the exit code is 1 if anything failed.
 *
 * Options: --runtime N (s, default 15), --quick (runtime 3 s, ramp 1 s), --jobs a,b,
 * --peers duplex,qemu-nbd,quorum, --out DIR.
 */
import { mkdirSync, writeFileSync, existsSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { fillVolume, jobs as allJobs, runJob } from './fio.js'
import type { FillResult, FioOptions, JobSpec } from './fio.js'
import { makePeer, peerNames, volumeBytes } from './peers.js'
import type { Peer, PeerName, RunningPeer } from './peers.js'
import { installCleanupHandlers, makeTempDir, peakRssBytes, run } from './proc.js'
import { describeMachine, renderMarkdown } from './report.js'
import type { Outcome, PeerReport, Report } from './report.js'

/** dist/bench/run.js → repository root. */
const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..')

interface Options {
  runtimeSec: number
  rampSec: number
  jobs: JobSpec[]
  peers: PeerName[]
  outDir: string
}

const usage = `usage: npm run bench -- [--runtime N] [--quick] [--jobs a,b] [--peers a,b] [--out DIR]
  jobs:  ${allJobs.map((j) => j.name).join(', ')}
  peers: ${peerNames.join(', ')}`

function fail(msg: string): never {
  process.stderr.write(`bench: ${msg}\n${usage}\n`)
  process.exit(2)
}

function parseList<T extends string>(value: string, allowed: readonly T[], what: string): T[] {
  const names = value.split(',').filter((s) => s !== '')
  for (const n of names) {
    if (!(allowed as readonly string[]).includes(n)) fail(`unknown ${what} '${n}'`)
  }
  return names as T[]
}

function parseArgs(argv: readonly string[]): Options {
  const opts: Options = {
    runtimeSec: 15,
    rampSec: 2,
    jobs: [...allJobs],
    peers: [...peerNames],
    outDir: join(repoRoot, 'bench', 'results'),
  }
  let runtimeGiven = false
  let quick = false
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] ?? ''
    const eq = arg.indexOf('=')
    const key = eq >= 0 ? arg.slice(0, eq) : arg
    const value = (): string => {
      if (eq >= 0) return arg.slice(eq + 1)
      const v = argv[++i]
      if (v === undefined) fail(`${key} needs a value`)
      return v
    }
    switch (key) {
      case '--runtime': {
        const n = Number(value())
        if (!Number.isInteger(n) || n < 1) fail('--runtime must be a positive integer (seconds)')
        opts.runtimeSec = n
        runtimeGiven = true
        break
      }
      case '--quick':
        quick = true
        break
      case '--jobs': {
        const names = parseList(
          value(),
          allJobs.map((j) => j.name),
          'job',
        )
        opts.jobs = allJobs.filter((j) => names.includes(j.name))
        break
      }
      case '--peers':
        opts.peers = parseList(value(), peerNames, 'peer')
        break
      case '--out':
        opts.outDir = resolve(value())
        break
      case '--help':
      case '-h':
        process.stdout.write(`${usage}\n`)
        process.exit(0)
        break
      default:
        fail(`unknown option '${arg}'`)
    }
  }
  if (quick) {
    if (!runtimeGiven) opts.runtimeSec = 3
    opts.rampSec = 1
  }
  if (opts.jobs.length === 0 || opts.peers.length === 0) fail('nothing to run')
  return opts
}

const log = (msg: string): void => {
  process.stderr.write(`bench: ${msg}\n`)
}

async function gitInfo(): Promise<{ sha: string; dirty: boolean }> {
  const sha = await run('git', ['-C', repoRoot, 'rev-parse', '--short', 'HEAD'])
  // --no-optional-locks: read-only, do not refresh the index.
  const st = await run('git', ['-C', repoRoot, '--no-optional-locks', 'status', '--porcelain'])
  return {
    sha: sha.code === 0 ? sha.stdout.trim() : 'nogit',
    dirty: st.code === 0 && st.stdout.trim() !== '',
  }
}

interface Live {
  readonly peer: Peer
  running: RunningPeer | null
  startError: string | null
  fill: FillResult | null
}

const errorText = (err: unknown): string => (err instanceof Error ? err.message : String(err))

async function startPeers(opts: Options): Promise<Live[]> {
  const live: Live[] = []
  for (const name of opts.peers) {
    const peer = makePeer(name, { repoRoot })
    const entry: Live = { peer, running: null, startError: null, fill: null }
    live.push(entry)
    log(`starting ${name}`)
    try {
      entry.running = await peer.start()
      log(`${name} ready at ${entry.running.uri}`)
    } catch (err) {
      entry.startError = errorText(err)
      log(`${name} failed to start: ${entry.startError}`)
    }
  }
  return live
}

async function runJobs(opts: Options, live: readonly Live[], scratchDir: string) {
  const fioOpts: FioOptions = {
    runtimeSec: opts.runtimeSec,
    rampSec: opts.rampSec,
    sizeBytes: volumeBytes,
    scratchDir,
  }
  const results: Record<string, Record<string, Outcome>> = {}
  const order: Record<string, string[]> = {}
  for (const [i, job] of opts.jobs.entries()) {
    const byPeer: Record<string, Outcome> = {}
    results[job.name] = byPeer
    const ordered = i % 2 === 0 ? [...live] : [...live].reverse()
    order[job.name] = ordered.map((l) => l.peer.name)
    for (const l of ordered) {
      if (l.running === null) continue
      try {
        if (job.needsFill && l.fill === null) {
          log(`${l.peer.name}: sequential fill of the whole volume before reads`)
          l.fill = await fillVolume(l.running.uri, fioOpts)
        }
        log(`${job.name} on ${l.peer.name}`)
        const result = await runJob(job, l.running.uri, fioOpts)
        byPeer[l.peer.name] = { ok: true, result }
        log(
          `  ${Math.round(result.iops)} IOPS, ${result.mbPerSec.toFixed(1)} MB/s, ` +
            `p50 ${result.clatP50Us ?? '–'} µs, p99 ${result.clatP99Us ?? '–'} µs`,
        )
      } catch (err) {
        byPeer[l.peer.name] = { ok: false, error: errorText(err) }
        log(`  failed: ${errorText(err)}`)
      }
    }
  }
  return { results, order }
}

async function stopPeers(live: readonly Live[]): Promise<PeerReport[]> {
  const reports: PeerReport[] = []
  for (const l of live) {
    const r = l.running
    const peakRss =
      r?.processes.map((p) => ({ process: p.name, pid: p.pid, bytes: peakRssBytes(p.pid) })) ?? []
    if (r !== null) {
      log(`stopping ${l.peer.name}`)
      await r.stop()
    }
    const exits =
      r?.processes.map((p) => ({
        process: p.name,
        code: p.child.exitCode,
        signal: p.child.signalCode,
      })) ?? []
    reports.push({
      name: l.peer.name,
      uri: r?.uri ?? null,
      startError: l.startError,
      peakRss,
      exits,
      fill: l.fill,
    })
  }
  return reports
}

async function main(): Promise<void> {
  installCleanupHandlers()
  const opts = parseArgs(process.argv.slice(2))
  if (opts.peers.includes('duplex') && !existsSync(join(repoRoot, 'dist/src/cli/main.js'))) {
    log('warning: dist/src/cli/main.js is missing; run `npm run build` (duplex will fail to start)')
  }
  const startedAt = new Date()
  const [machine, git] = await Promise.all([describeMachine(), gitInfo()])
  const scratchDir = makeTempDir('fio')
  const live = await startPeers(opts)
  let runs: Awaited<ReturnType<typeof runJobs>>
  try {
    runs = await runJobs(opts, live, scratchDir)
  } catch (err) {
    await stopPeers(live)
    throw err
  }
  // stopPeers reads peak RSS first, while the processes are still alive.
  const peers = await stopPeers(live)
  const report: Report = {
    startedAt: startedAt.toISOString(),
    gitSha: git.sha,
    gitDirty: git.dirty,
    options: { runtimeSec: opts.runtimeSec, rampSec: opts.rampSec, volumeBytes },
    machine,
    jobs: opts.jobs,
    peers,
    results: runs.results,
    order: runs.order,
  }
  const md = renderMarkdown(report)
  mkdirSync(opts.outDir, { recursive: true })
  const stamp = startedAt
    .toISOString()
    .replace(/\.\d+Z$/, 'Z')
    .replace(/:/g, '-')
  const base = join(opts.outDir, `${stamp}-${git.sha}`)
  writeFileSync(`${base}.json`, JSON.stringify(report, null, 2) + '\n')
  writeFileSync(`${base}.md`, md)
  process.stdout.write(md)
  log(`wrote ${base}.json and ${base}.md`)
  const failed =
    peers.some((p) => p.startError !== null) ||
    Object.values(report.results).some((byPeer) => Object.values(byPeer).some((o) => !o.ok))
  process.exitCode = failed ? 1 : 0
}

main().catch((err: unknown) => {
  process.stderr.write(
    `bench: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`,
  )
  process.exit(1)
})
