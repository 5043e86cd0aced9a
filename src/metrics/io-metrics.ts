/**
 * Client-visible I/O metrics of a node, per volume and NBD command: requests, data bytes,
 * failures, latency (a histogram, from dispatch to the reply being queued) and requests in
 * flight. The NBD server reports each request through `NbdRequestObserver`.
 *
 * Cost on the request path: prom-client's label children hash their labels on every update
 * (about 2 µs a request for the four metrics here, measured), so the request path only bumps
 * plain numbers in one record per (volume, command) and the metrics are read from those records
 * at scrape time (`CollectedMetric`), as the replication metrics read the controllers.
 */
import type { Metric, Registry } from 'prom-client'
import type { NbdRequestObserver } from '../nbd/server.js'

/** Seconds: 50 µs to 10 s, dense where a synchronous write across sites lands (0.2-5 ms). */
export const latencyBuckets = [
  0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
  5, 10,
]

interface Series {
  volume: string
  op: string
  requests: number
  bytes: number
  errors: number
  /** Observations per bucket (not cumulative); the last slot is +Inf. */
  buckets: Float64Array
  seconds: number
}

type Labels = Record<string, string>
interface Value {
  labels: Labels
  value: number
  metricName?: string
}

/**
 * A metric whose values are computed at scrape time, in prom-client's registry (the interface
 * its exposition reads: name, help, type, `get` and `reset`).
 */
class CollectedMetric {
  readonly aggregator = 'sum'

  constructor(
    readonly name: string,
    readonly help: string,
    readonly type: 'counter' | 'gauge' | 'histogram',
    private readonly values: () => Value[],
  ) {}

  get(): Promise<{
    name: string
    help: string
    type: string
    aggregator: string
    values: Value[]
  }> {
    const { name, help, type, aggregator } = this
    return Promise.resolve({ name, help, type, aggregator, values: this.values() })
  }

  reset(): void {
    // The totals belong to the node's lifetime; nothing to reset.
  }
}

export class IoMetrics implements NbdRequestObserver {
  private readonly series = new Map<string, Series>()
  private readonly inflightByVolume = new Map<string, number>()

  /**
   * `liveVolumes`: the volumes this node serves now; at each scrape the series of the others
   * (deleted, moved away) are dropped, so the series follow the volumes, not their history.
   */
  constructor(
    registry: Registry,
    private readonly liveVolumes?: () => Iterable<string>,
  ) {
    const perSeries = (pick: (series: Series) => number) => (): Value[] => {
      this.prune()
      return [...this.series.values()].map((series) => ({
        labels: { volume: series.volume, op: series.op },
        value: pick(series),
      }))
    }
    const metrics = [
      new CollectedMetric(
        'duplex_volume_requests_total',
        'NBD requests completed, by volume and command (read, write, flush, trim, zero, ...)',
        'counter',
        perSeries((series) => series.requests),
      ),
      new CollectedMetric(
        'duplex_volume_data_bytes_total',
        'Data bytes read or written by NBD clients, by volume and command',
        'counter',
        perSeries((series) => series.bytes),
      ),
      new CollectedMetric(
        'duplex_volume_request_errors_total',
        'NBD requests that failed (the client got an error), by volume and command',
        'counter',
        perSeries((series) => series.errors),
      ),
      new CollectedMetric(
        'duplex_volume_request_duration_seconds',
        'Time from receiving an NBD request to queueing its reply (as the client sees it)',
        'histogram',
        () => {
          this.prune()
          return [...this.series.values()].flatMap(histogramValues)
        },
      ),
      new CollectedMetric(
        'duplex_volume_requests_in_flight',
        'NBD requests received and not yet answered, by volume',
        'gauge',
        () => {
          this.prune()
          return [...this.inflightByVolume].map(([volume, value]) => ({
            labels: { volume },
            value,
          }))
        },
      ),
    ]
    for (const metric of metrics) registry.registerMetric(metric as unknown as Metric)
  }

  started(volume: string): void {
    this.inflightByVolume.set(volume, (this.inflightByVolume.get(volume) ?? 0) + 1)
  }

  finished(volume: string, kind: string, bytes: number, seconds: number, failed: boolean): void {
    this.inflightByVolume.set(volume, (this.inflightByVolume.get(volume) ?? 1) - 1)
    const key = `${volume}\0${kind}`
    let series = this.series.get(key)
    if (series === undefined) {
      series = {
        volume,
        op: kind,
        requests: 0,
        bytes: 0,
        errors: 0,
        buckets: new Float64Array(latencyBuckets.length + 1),
        seconds: 0,
      }
      this.series.set(key, series)
    }
    series.requests += 1
    series.bytes += bytes
    if (failed) series.errors += 1
    series.seconds += seconds
    let bucket = 0
    while (bucket < latencyBuckets.length && seconds > (latencyBuckets[bucket] ?? Infinity)) {
      bucket += 1
    }
    series.buckets[bucket] = (series.buckets[bucket] ?? 0) + 1
  }

  /** Drops the series of volumes no longer served here (none in flight). */
  private prune(): void {
    if (this.liveVolumes === undefined) return
    const live = new Set(this.liveVolumes())
    for (const [volume, count] of [...this.inflightByVolume]) {
      if (live.has(volume) || count !== 0) continue
      this.inflightByVolume.delete(volume)
      for (const [key, series] of [...this.series]) {
        if (series.volume === volume) this.series.delete(key)
      }
    }
  }
}

/** A series as Prometheus histogram lines: cumulative `_bucket`s, `_sum` and `_count`. */
function histogramValues(series: Series): Value[] {
  const labels = { volume: series.volume, op: series.op }
  const name = 'duplex_volume_request_duration_seconds'
  const values: Value[] = []
  let cumulative = 0
  latencyBuckets.forEach((le, index) => {
    cumulative += series.buckets[index] ?? 0
    values.push({
      labels: { ...labels, le: String(le) },
      value: cumulative,
      metricName: `${name}_bucket`,
    })
  })
  values.push({
    labels: { ...labels, le: '+Inf' },
    value: series.requests,
    metricName: `${name}_bucket`,
  })
  values.push({ labels, value: series.seconds, metricName: `${name}_sum` })
  values.push({ labels, value: series.requests, metricName: `${name}_count` })
  return values
}
