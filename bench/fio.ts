/**
 * The fio jobs the benchmark runs, and running one against an NBD URI with `--ioengine=nbd`.
 *
 * Every peer gets byte-identical fio arguments except `--uri`. fio writes its JSON to a file
 * (`--output`) rather than stdout so that warnings on stdout cannot corrupt the parse. We report
 * completion latency (clat), the time from submission to completion as the engine sees it.
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { spawnTracked, stopTracked } from './proc.js'

export interface JobSpec {
  readonly name: string
  readonly rw: 'randwrite' | 'randread' | 'write'
  readonly bs: string
  readonly iodepth: number
  /** The volume must be filled before this job so reads do not hit holes. */
  readonly needsFill: boolean
  /** This job's headline metric is latency (p50/p99), not throughput. */
  readonly latencyJob: boolean
}

export const jobs: readonly JobSpec[] = [
  {
    name: 'randwrite-4k-qd32',
    rw: 'randwrite',
    bs: '4k',
    iodepth: 32,
    needsFill: false,
    latencyJob: false,
  },
  {
    name: 'randread-4k-qd32',
    rw: 'randread',
    bs: '4k',
    iodepth: 32,
    needsFill: true,
    latencyJob: false,
  },
  {
    name: 'seqwrite-1m-qd8',
    rw: 'write',
    bs: '1m',
    iodepth: 8,
    needsFill: false,
    latencyJob: false,
  },
  {
    name: 'randwrite-4k-qd1',
    rw: 'randwrite',
    bs: '4k',
    iodepth: 1,
    needsFill: false,
    latencyJob: true,
  },
]

export interface FioResult {
  readonly iops: number
  /** Decimal megabytes (10^6 bytes) per second. */
  readonly mbPerSec: number
  readonly clatP50Us: number | null
  readonly clatP99Us: number | null
  readonly clatMeanUs: number
  /** I/Os completed in the measured window (after ramp). */
  readonly ios: number
  readonly errors: number
}

export interface FioOptions {
  readonly runtimeSec: number
  readonly rampSec: number
  readonly sizeBytes: number
  /** Where fio writes its JSON output. */
  readonly scratchDir: string
}

const commonArgs = (uri: string, size: number): string[] => [
  '--ioengine=nbd',
  `--uri=${uri}`,
  `--size=${size}`,
  '--numjobs=1',
  '--group_reporting',
  '--output-format=json',
]

function timedArgs(job: JobSpec, opts: FioOptions): string[] {
  return [
    `--name=${job.name}`,
    `--rw=${job.rw}`,
    `--bs=${job.bs}`,
    `--iodepth=${job.iodepth}`,
    '--time_based',
    `--runtime=${opts.runtimeSec}`,
    `--ramp_time=${opts.rampSec}`,
  ]
}

let runCounter = 0

/** Run fio with `args` and return the parsed JSON document. */
async function fio(args: readonly string[], scratchDir: string, timeoutMs: number) {
  const out = join(scratchDir, `fio-${++runCounter}.json`)
  const proc = spawnTracked('fio', 'fio', [...args, `--output=${out}`])
  const timer = setTimeout(() => {
    void stopTracked(proc, 2000)
  }, timeoutMs)
  await proc.exited()
  clearTimeout(timer)
  const code = proc.child.exitCode
  if (code !== 0) {
    let json = ''
    try {
      json = readFileSync(out, 'utf8').slice(-2000)
    } catch {
      // no output file
    }
    throw new Error(
      `fio exited ${code ?? proc.child.signalCode ?? '?'} (timeout ${timeoutMs} ms):\n${proc.output()}${json}`,
    )
  }
  return JSON.parse(readFileSync(out, 'utf8')) as unknown
}

interface FioJsonDir {
  iops: number
  bw_bytes: number
  total_ios: number
  clat_ns: { mean: number; percentile?: Record<string, number> }
}
interface FioJsonJob {
  error: number
  read: FioJsonDir
  write: FioJsonDir
}

function firstJob(doc: unknown): FioJsonJob {
  const jobsArr = (doc as { jobs?: FioJsonJob[] }).jobs
  const job = jobsArr?.[0]
  if (job === undefined) throw new Error('fio JSON has no jobs')
  return job
}

/** One measured run of `job` against `uri`. */
export async function runJob(job: JobSpec, uri: string, opts: FioOptions): Promise<FioResult> {
  const timeoutMs = (opts.runtimeSec + opts.rampSec + 60) * 1000
  const doc = await fio(
    [...timedArgs(job, opts), ...commonArgs(uri, opts.sizeBytes)],
    opts.scratchDir,
    timeoutMs,
  )
  const j = firstJob(doc)
  const d = job.rw === 'randread' ? j.read : j.write
  const pct = (key: string): number | null => {
    const ns = d.clat_ns.percentile?.[key]
    return ns === undefined ? null : ns / 1000
  }
  return {
    iops: d.iops,
    mbPerSec: d.bw_bytes / 1e6,
    clatP50Us: pct('50.000000'),
    clatP99Us: pct('99.000000'),
    clatMeanUs: d.clat_ns.mean / 1000,
    ios: d.total_ios,
    errors: j.error,
  }
}

export interface FillResult {
  readonly seconds: number
  readonly mbPerSec: number
}

/** Sequential 1 MiB write over the whole volume, so later reads hit real data. */
export async function fillVolume(uri: string, opts: FioOptions): Promise<FillResult> {
  const started = Date.now()
  const doc = await fio(
    ['--name=fill', '--rw=write', '--bs=1m', '--iodepth=8', ...commonArgs(uri, opts.sizeBytes)],
    opts.scratchDir,
    600_000,
  )
  const j = firstJob(doc)
  return { seconds: (Date.now() - started) / 1000, mbPerSec: j.write.bw_bytes / 1e6 }
}
