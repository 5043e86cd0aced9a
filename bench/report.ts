/**
 * The benchmark report: machine description, the JSON document, and the markdown tables.
 *
 * Ratios compare each duplex subject (`duplex`, `duplex-replicated`, `duplex-replicated-tls`)
 * with each other peer on the same run; `duplex-replicated-tls` also with `duplex-replicated`
 * (the cost of TLS). Throughput ratio is duplex/peer (IOPS and MB/s give the same ratio at a
 * fixed block size); latency ratio is peer/duplex. In both, > 1 means duplex is better. Targets
 * (`targets`): single-node duplex >= 0.8x qemu-nbd on every job (issue 2); replicated duplex
 * >= 1.5x quorum on 4k random writes, >= 1.0x on 1M sequential writes and on qd1 p50 latency,
 * >= 0.8x unreplicated qemu-nbd on 4k random reads (issue 3).
 */
import { cpus, freemem, totalmem, release, hostname } from 'node:os'
import { run } from './proc.js'
import type { FillResult, FioResult, JobSpec } from './fio.js'

export const targetRatio = 0.8
export const targetPeer = 'qemu-nbd'

/** What each duplex subject must reach against which peer, per job (judged as in ratioTable). */
export const targets: Record<string, Record<string, Record<string, number>>> = {
  duplex: {
    'qemu-nbd': {
      'randwrite-4k-qd32': targetRatio,
      'randread-4k-qd32': targetRatio,
      'seqwrite-1m-qd8': targetRatio,
      'randwrite-4k-qd1': targetRatio,
    },
  },
  'duplex-replicated': {
    quorum: { 'randwrite-4k-qd32': 1.5, 'seqwrite-1m-qd8': 1.0, 'randwrite-4k-qd1': 1.0 },
    'qemu-nbd': { 'randread-4k-qd32': 0.8 },
  },

  // No target: reported for the cost of TLS, compared with the plaintext pair too.
  'duplex-replicated-tls': {},
}

const subjects = Object.keys(targets)

/** Other subjects a subject is also compared with: the cost of one feature. */
const alsoVersus: Record<string, string[]> = { 'duplex-replicated-tls': ['duplex-replicated'] }

export interface Machine {
  readonly hostname: string
  readonly nproc: number
  readonly cpuModel: string
  readonly memTotalBytes: number
  readonly memFreeBytesAtStart: number
  readonly kernel: string
  readonly node: string
  readonly fio: string
  readonly qemu: string
}

export async function describeMachine(): Promise<Machine> {
  const fio = await run('fio', ['--version'])
  const qemu = await run('qemu-nbd', ['--version'])
  return {
    hostname: hostname(),
    nproc: cpus().length,
    cpuModel: cpus()[0]?.model ?? 'unknown',
    memTotalBytes: totalmem(),
    memFreeBytesAtStart: freemem(),
    kernel: release(),
    node: process.version,
    fio: fio.stdout.trim(),
    qemu: qemu.stdout.split('\n')[0]?.trim() ?? 'unknown',
  }
}

export type Outcome = { ok: true; result: FioResult } | { ok: false; error: string }

export interface PeerReport {
  readonly name: string
  readonly uri: string | null
  /** Set if the peer could not be started; then it has no results. */
  readonly startError: string | null
  /** Peak RSS per process, read from VmHWM just before stopping. */
  readonly peakRss: readonly { process: string; pid: number; bytes: number | null }[]
  /** How each process ended after SIGTERM (SIGKILL follows after 5 s): 0 means a clean stop. */
  readonly exits: readonly { process: string; code: number | null; signal: string | null }[]
  readonly fill: FillResult | null
}

export interface Report {
  readonly startedAt: string
  readonly gitSha: string
  readonly gitDirty: boolean
  readonly options: { runtimeSec: number; rampSec: number; volumeBytes: number }
  readonly machine: Machine
  readonly jobs: readonly JobSpec[]
  readonly peers: readonly PeerReport[]
  /** results[job][peer] */
  readonly results: Record<string, Record<string, Outcome>>
  /** Order in which peers ran each job (alternates to spread drift). */
  readonly order: Record<string, readonly string[]>
}

const fmt = (n: number | null | undefined, digits = 0): string =>
  n === null || n === undefined || !Number.isFinite(n)
    ? '–'
    : n.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits })

const ratio = (num: number | null, den: number | null): number | null =>
  num === null || den === null || den === 0 ? null : num / den

const mib = (bytes: number | null): string => (bytes === null ? '–' : fmt(bytes / 2 ** 20, 1))

function resultsTable(r: Report): string[] {
  const lines = [
    '| job | peer | IOPS | MB/s | clat p50 µs | clat p99 µs |',
    '|---|---|--:|--:|--:|--:|',
  ]
  for (const job of r.jobs) {
    for (const peer of r.peers) {
      const o = r.results[job.name]?.[peer.name]
      if (o === undefined) continue
      if (!o.ok) {
        lines.push(`| ${job.name} | ${peer.name} | error | | | |`)
        continue
      }
      const x = o.result
      lines.push(
        `| ${job.name} | ${peer.name} | ${fmt(x.iops)} | ${fmt(x.mbPerSec, 1)} | ${fmt(x.clatP50Us, 1)} | ${fmt(x.clatP99Us, 1)} |`,
      )
    }
  }
  return lines
}

function ratioTable(r: Report, subject: string): string[] {
  const others = r.peers.filter(
    (p) => !subjects.includes(p.name) || (alsoVersus[subject] ?? []).includes(p.name),
  )
  const lines = [
    `| job | vs peer | throughput ${subject}/peer | p50 latency peer/${subject} | p99 latency peer/${subject} | target |`,
    '|---|---|--:|--:|--:|:-:|',
  ]
  for (const job of r.jobs) {
    const d = r.results[job.name]?.[subject]
    for (const peer of others) {
      const p = r.results[job.name]?.[peer.name]
      if (d === undefined || p === undefined) continue
      if (!d.ok || !p.ok) {
        lines.push(`| ${job.name} | ${peer.name} | error | | | |`)
        continue
      }
      const tp = ratio(d.result.iops, p.result.iops)
      const l50 = ratio(p.result.clatP50Us, d.result.clatP50Us)
      const l99 = ratio(p.result.clatP99Us, d.result.clatP99Us)
      // The latency job is judged on p50 latency, the others on throughput.
      const judged = job.latencyJob ? l50 : tp
      const target = targets[subject]?.[peer.name]?.[job.name]
      const mark =
        target === undefined || judged === null
          ? ''
          : `${judged >= target ? 'pass' : 'FAIL'} (≥ ${target}x)`
      lines.push(
        `| ${job.name} | ${peer.name} | ${fmt(tp, 2)} | ${fmt(l50, 2)} | ${fmt(l99, 2)} | ${mark} |`,
      )
    }
  }
  return lines
}

function peersTable(r: Report): string[] {
  const lines = [
    '| peer | process | pid | peak RSS MiB | exit after SIGTERM | fill MB/s |',
    '|---|---|--:|--:|---|--:|',
  ]
  for (const p of r.peers) {
    if (p.startError !== null) {
      lines.push(`| ${p.name} | failed to start | | | | |`)
      continue
    }
    for (const [i, rss] of p.peakRss.entries()) {
      const e = p.exits[i]
      const exit = e === undefined ? '–' : (e.signal ?? `code ${e.code ?? '?'}`)
      lines.push(
        `| ${p.name} | ${rss.process} | ${rss.pid} | ${mib(rss.bytes)} | ${exit} | ${fmt(p.fill?.mbPerSec, 1)} |`,
      )
    }
  }
  return lines
}

export function renderMarkdown(r: Report): string {
  const m = r.machine
  const out = [
    `# duplex benchmark ${r.startedAt} (${r.gitSha}${r.gitDirty ? ', dirty tree' : ''})`,
    '',
    `Machine: ${m.nproc} CPUs (${m.cpuModel}), ${mib(m.memTotalBytes)} MiB RAM, Linux ${m.kernel}, ` +
      `Node ${m.node}, ${m.fio}, ${m.qemu}.`,
    `fio: ioengine=nbd, numjobs=1, runtime ${r.options.runtimeSec} s after ${r.options.rampSec} s ramp, ` +
      `size ${mib(r.options.volumeBytes)} MiB, fresh sparse volume per peer, peers alternate order per job.`,
    '',
    '## Results',
    '',
    ...resultsTable(r),
  ]
  for (const subject of subjects) {
    if (!r.peers.some((p) => p.name === subject) || r.peers.length < 2) continue
    out.push(
      '',
      `## Ratios for ${subject} (> 1 is better for ${subject})`,
      '',
      `Throughput ratio = ${subject}/peer; latency ratios = peer/${subject}. ` +
        'Targets are judged on throughput for the qd32/qd8 jobs, on p50 latency for qd1.',
      '',
      ...ratioTable(r, subject),
    )
  }
  out.push('', '## Peers', '', ...peersTable(r))
  const errors: string[] = []
  for (const p of r.peers) {
    if (p.startError !== null) errors.push(`- ${p.name} start: ${firstLines(p.startError)}`)
  }
  for (const [job, byPeer] of Object.entries(r.results)) {
    for (const [peer, o] of Object.entries(byPeer)) {
      if (!o.ok) errors.push(`- ${job} on ${peer}: ${firstLines(o.error)}`)
    }
  }
  if (errors.length > 0) out.push('', '## Errors', '', ...errors)
  return out.join('\n') + '\n'
}

function firstLines(s: string): string {
  return s.split('\n').slice(0, 6).join(' ⏎ ').slice(0, 600)
}
